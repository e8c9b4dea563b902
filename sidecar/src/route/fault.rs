//! Fault injection, Envoy's `envoy.filters.http.fault` as a route's per-filter config
//! (Istio's `VirtualService.http.fault`): a fixed delay and/or an abort, each for a fraction
//! of requests, drawn independently.

use std::time::Duration;

use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::fault_abort::ErrorType;
use envoy_types::pb::google::protobuf::Any;
use hyper::StatusCode;
use prost::Message;

use super::Invalid;
use super::fraction::Fraction;

/// The filter name routes key their fault config by.
pub const FILTER: &str = "envoy.filters.http.fault";
const HTTP_FAULT_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";

/// Envoy's body for an aborted request.
pub const ABORT_BODY: &str = "fault filter abort";

/// How an aborted request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    Http(StatusCode),
    /// `200` with this `grpc-status`, as Envoy answers a gRPC abort.
    Grpc(u32),
}

/// A route's faults.
#[derive(Debug, Clone, Default)]
pub struct Fault {
    delay: Option<(Duration, Fraction)>,
    abort: Option<(Abort, Fraction)>,
}

/// What one request drew.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Injected {
    pub delay: Option<Duration>,
    pub abort: Option<Abort>,
}

impl Fault {
    /// Reads the fault filter's entry of `typed_per_filter_config`, if any.
    pub fn compile(config: Option<&Any>) -> Result<Option<Fault>, Invalid> {
        let Some(any) = config else { return Ok(None) };
        if any.type_url != HTTP_FAULT_TYPE {
            return Err(Invalid(format!(
                "{FILTER}: expected {HTTP_FAULT_TYPE}, got {}",
                any.type_url
            )));
        }
        let f = HttpFault::decode(any.value.as_slice()).map_err(|e| Invalid(format!("{FILTER}: {e}")))?;
        let delay = match f.delay {
            Some(d) => match d.fault_delay_secifier {
                Some(FaultDelaySecifier::FixedDelay(fixed)) => {
                    let duration = super::duration(&fixed, "fault delay")?;
                    Some((duration, Fraction::of(d.percentage.as_ref())))
                }
                _ => return Err(Invalid(format!("{FILTER}: only a fixed delay is supported"))),
            },
            None => None,
        };
        let abort = match f.abort {
            Some(a) => {
                let how = match a.error_type {
                    Some(ErrorType::HttpStatus(code)) => Abort::Http(
                        u16::try_from(code)
                            .ok()
                            .and_then(|c| StatusCode::from_u16(c).ok())
                            .filter(|c| c.as_u16() >= 200)
                            .ok_or_else(|| Invalid(format!("{FILTER}: abort status {code}")))?,
                    ),
                    Some(ErrorType::GrpcStatus(code)) => Abort::Grpc(code),
                    _ => return Err(Invalid(format!("{FILTER}: abort needs http_status or grpc_status"))),
                };
                Some((how, Fraction::of(a.percentage.as_ref())))
            }
            None => None,
        };
        Ok(Some(Fault { delay, abort }))
    }

    /// Draws this request's faults.
    pub fn draw(&self) -> Injected {
        Injected {
            delay: self.delay.filter(|(_, f)| f.sample()).map(|(d, _)| d),
            abort: self.abort.filter(|(_, f)| f.sample()).map(|(a, _)| a),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::FaultDelay;
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::FaultAbort;
    use envoy_types::pb::envoy::r#type::v3::FractionalPercent;

    fn percent(numerator: u32) -> Option<FractionalPercent> {
        Some(FractionalPercent {
            numerator,
            denominator: 0,
        })
    }

    fn any(f: &HttpFault) -> Any {
        Any {
            type_url: HTTP_FAULT_TYPE.into(),
            value: f.encode_to_vec(),
        }
    }

    #[test]
    fn delay_and_abort_by_percentage() {
        let f = HttpFault {
            delay: Some(FaultDelay {
                percentage: percent(100),
                fault_delay_secifier: Some(FaultDelaySecifier::FixedDelay(
                    envoy_types::pb::google::protobuf::Duration { seconds: 2, nanos: 0 },
                )),
            }),
            abort: Some(FaultAbort {
                percentage: percent(0),
                error_type: Some(ErrorType::HttpStatus(503)),
                ..Default::default()
            }),
            ..Default::default()
        };
        let fault = Fault::compile(Some(&any(&f))).unwrap().unwrap();
        assert_eq!(
            fault.draw(),
            Injected {
                delay: Some(Duration::from_secs(2)),
                abort: None
            }
        );
        // Istio's empty filter config on the listener: no fault at all.
        let empty = Fault::compile(Some(&any(&HttpFault::default()))).unwrap().unwrap();
        assert_eq!(empty.draw(), Injected::default());
        assert!(Fault::compile(None).unwrap().is_none());
        let mut bad = f.clone();
        bad.abort.as_mut().unwrap().error_type = Some(ErrorType::HttpStatus(42));
        assert!(Fault::compile(Some(&any(&bad))).is_err());
        let wrong_type = Any {
            type_url: "type.googleapis.com/other".into(),
            value: vec![],
        };
        assert!(Fault::compile(Some(&wrong_type)).is_err());
    }
}
