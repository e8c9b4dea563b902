//! RDS from the controller, as the sidecar's router uses it: arbitrary bytes are read as a
//! RouteConfiguration and compiled into a `RouteTable`; a table that compiles then routes
//! requests built from its own domains and paths (so matching gets past the virtual host)
//! plus a few fixed ones, applying header mutations, weighted picks, rewrites, redirects,
//! hash policies, retry decisions and faults as the router does. Checks: no panic; routing
//! the same request twice picks the same route.

#![no_main]

use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, route_match};
use hyper::http::request::Parts;
use hyper::{HeaderMap, Request, StatusCode};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use sidecar::route::RouteTable;
use sidecar::route::action::Action;
use sidecar::route::retry::{Outcome, RetryPolicy};

/// The request heads to route: each authority with each path, and each method.
fn requests(rc: &RouteConfiguration) -> Vec<Parts> {
    let mut authorities = vec!["reviews:9080".to_owned()];
    let mut paths = vec!["/".to_owned(), "/reviews/1?user=jason".to_owned()];
    for vh in rc.virtual_hosts.iter().take(4) {
        authorities.extend(vh.domains.iter().take(2).map(|d| d.replace('*', "x")));
        for r in vh.routes.iter().take(4) {
            match r.r#match.as_ref().and_then(|m| m.path_specifier.as_ref()) {
                Some(route_match::PathSpecifier::Prefix(p) | route_match::PathSpecifier::Path(p)) => {
                    paths.push(p.clone());
                }
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    for authority in &authorities {
        for path in &paths {
            for method in ["GET", "POST"] {
                let req = Request::builder()
                    .method(method)
                    .uri(format!("http://{authority}{path}"))
                    .header("host", authority.as_str())
                    .header("end-user", "jason")
                    .header("cookie", "session=abc")
                    .body(());
                if let Ok(req) = req {
                    out.push(req.into_parts().0);
                }
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(rc) = RouteConfiguration::decode(data) else {
        return;
    };
    let Ok(table) = RouteTable::compile(&rc) else { return };
    for parts in requests(&rc) {
        let Some(selected) = table.select(&parts) else { continue };
        let again = table.select(&parts).map(|s| s.route.name.as_str());
        assert_eq!(again, Some(selected.route.name.as_str()), "routing is deterministic");
        let mut headers = parts.headers.clone();
        let target = match &selected.route.action {
            Action::Forward(f) => {
                let target = f.pick();
                let _ = f.path(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
                let _ = f.hash.hash(&parts, Some([10, 0, 0, 1].into()));
                if let Some(retry) = RetryPolicy::for_request(f.retry.as_ref(), &parts.headers) {
                    let empty = HeaderMap::new();
                    let _ = retry.retriable(&parts, Outcome::Response(StatusCode::SERVICE_UNAVAILABLE, &empty));
                    let _ = retry.retriable(&parts, Outcome::ConnectFailure);
                    let _ = retry.backoff(retry.num_retries.min(8));
                }
                Some(target)
            }
            Action::Redirect(r) => {
                let _ = (r.status(), r.location(&parts));
                None
            }
            Action::Direct { .. } => None,
        };
        selected.request_headers(target, &mut headers);
        selected.response_headers(target, &mut headers);
        if let Some(fault) = &selected.route.fault {
            let _ = fault.draw();
        }
    }
});
