//! Leader election with a `coordination.k8s.io/v1` Lease, as client-go does it: the holder
//! renews every `renew`; another replica takes the lease over only once the record has
//! stayed unchanged for the lease duration *as it observed it* (its own clock, so clock
//! skew between replicas does not matter); every write carries the resourceVersion it
//! read, so of two replicas racing for an expired lease exactly one wins. A holder that
//! could not renew for two thirds of the duration stops leading before anyone may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio::time::Instant;

/// The lease and who we are.
#[derive(Debug, Clone)]
pub struct Config {
    pub namespace: String,
    pub name: String,
    /// This replica's holder identity (its pod name).
    pub identity: String,
    pub duration: Duration,
    pub renew: Duration,
}

impl Config {
    /// `isthmus-controller` in `istio-system`, 15 s, renewed every 5 s.
    pub fn new(identity: String) -> Self {
        Self {
            namespace: "istio-system".into(),
            name: "isthmus-controller".into(),
            identity,
            duration: Duration::from_secs(15),
            renew: Duration::from_secs(5),
        }
    }
}

/// The lease record as last read, and when this replica saw it change.
struct Observed {
    record: (Option<String>, Option<String>, Option<String>),
    at: Instant,
}

/// Elects, publishing on `leader` whether we lead, until `leader` has no receivers.
pub async fn run(client: Client, config: Config, leader: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observed: Option<Observed> = None;
    let mut renewed: Option<Instant> = None;
    let deadline = config.duration * 2 / 3;
    loop {
        // Bounded: the client retries a 503 or 429 with backoff for minutes, and a leader
        // must know it can no longer renew before another replica may take over.
        let budget = match renewed {
            Some(r) => deadline.saturating_sub(r.elapsed()),
            None => config.duration,
        };
        let round = tokio::time::timeout(
            budget.max(Duration::from_millis(100)),
            attempt(&api, &config, &mut observed),
        );
        let holds = match round
            .await
            .unwrap_or_else(|_| Err(kube::Error::Service("timed out".into())))
        {
            Ok(true) => {
                renewed = Some(Instant::now());
                true
            }
            Ok(false) => {
                renewed = None;
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, lease = config.name, "leader election: cannot reach the lease");
                // Keep leading through a short outage only: past the deadline another
                // replica may soon take the lease over.
                renewed.is_some_and(|r| r.elapsed() < deadline)
            }
        };
        let was = leader.send_replace(holds);
        if was != holds {
            tracing::info!(identity = config.identity, leader = holds, "leader election");
        }
        if leader.is_closed() {
            return;
        }
        tokio::time::sleep(config.renew).await;
    }
}

/// One round: acquire, renew or observe. Returns whether we hold the lease now.
async fn attempt(api: &Api<Lease>, config: &Config, observed: &mut Option<Observed>) -> Result<bool, kube::Error> {
    let now = MicroTime(Timestamp::now());
    let seconds = i32::try_from(config.duration.as_secs()).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                namespace: Some(config.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_duration_seconds: Some(seconds),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false), // another replica was first
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let record = (
        spec.holder_identity.clone(),
        spec.renew_time.as_ref().map(|t| t.0.to_string()),
        lease.resource_version(),
    );
    if observed.as_ref().is_none_or(|o| o.record != record) {
        *observed = Some(Observed {
            record,
            at: Instant::now(),
        });
    }
    let held_for = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(seconds).max(0) as u64);
    let mine = spec.holder_identity.as_deref() == Some(config.identity.as_str());
    let vacant = spec.holder_identity.as_deref().is_none_or(str::is_empty);
    let expired = observed.as_ref().is_some_and(|o| o.at.elapsed() >= held_for);
    if !mine && !vacant && !expired {
        return Ok(false);
    }
    let mut next = LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        renew_time: Some(now.clone()),
        lease_duration_seconds: Some(seconds),
        ..spec.clone()
    };
    if !mine {
        next.acquire_time = Some(now);
        next.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    lease.spec = Some(next);
    // The resourceVersion read above is the precondition: a 409 means someone wrote first.
    match api.replace(&config.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the lease up if we hold it (client-go's release on cancel), so that on a rolling
/// update or a scale-down another replica takes over at its next check instead of after
/// the lease duration. Returns whether there was anything to give up.
pub async fn release(client: Client, config: &Config) -> Result<bool, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        return Ok(false);
    };
    let mut spec = lease.spec.clone().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return Ok(false);
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    lease.spec = Some(spec);
    api.replace(&config.name, &PostParams::default(), &lease).await?;
    Ok(true)
}
