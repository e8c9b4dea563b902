//! A small Kubernetes API server for tests, honest about list/watch: every
//! change gets a resourceVersion; a list returns the objects and the version it
//! was taken at; a watch from version R replays the later events of its kind,
//! sends a BOOKMARK once caught up (when asked for), then streams new events; a
//! watch from a version older than the compaction point gets the `410 Expired`
//! ERROR event a real API server sends; and the test can cut every watch.
//!
//! It also answers `TokenReview`s (POST `/apis/authentication.k8s.io/v1/tokenreviews`) from
//! the tokens a test registers, reading `spec.token` and `spec.audiences` as kube-apiserver
//! does: a bound service-account token authenticates only for an audience it was minted
//! for, and the answer names the audiences both sides share.
//!
//! Writes are those of kube-apiserver too: POST creates (`409 AlreadyExists` when the name
//! is taken, `404` when the namespace does not exist), PUT replaces (`409 Conflict` when `metadata.resourceVersion` is not the
//! current one), DELETE deletes (`409 Conflict` when its preconditions do not hold), each
//! a watch event. The MCS and Istio kinds are CustomResourceDefinitions: a cluster without
//! them answers `404`, so they are served only once a test installs them.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

/// The kinds served: (collection path, kind, list kind, apiVersion).
const KINDS: &[(&str, &str, &str, &str)] = &[
    ("/api/v1/namespaces", "Namespace", "NamespaceList", "v1"),
    ("/api/v1/services", "Service", "ServiceList", "v1"),
    ("/api/v1/pods", "Pod", "PodList", "v1"),
    ("/api/v1/nodes", "Node", "NodeList", "v1"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "EndpointSlice",
        "EndpointSliceList",
        "discovery.k8s.io/v1",
    ),
    ("/api/v1/secrets", "Secret", "SecretList", "v1"),
    (
        "/apis/coordination.k8s.io/v1/leases",
        "Lease",
        "LeaseList",
        "coordination.k8s.io/v1",
    ),
];

/// The kinds of CRDs, served after [`FakeApi::install_crds`].
const CRD_KINDS: &[(&str, &str, &str, &str)] = &[
    (
        "/apis/multicluster.x-k8s.io/v1alpha1/serviceexports",
        "ServiceExport",
        "ServiceExportList",
        "multicluster.x-k8s.io/v1alpha1",
    ),
    (
        "/apis/multicluster.x-k8s.io/v1alpha1/serviceimports",
        "ServiceImport",
        "ServiceImportList",
        "multicluster.x-k8s.io/v1alpha1",
    ),
    (
        "/apis/networking.istio.io/v1/serviceentries",
        "ServiceEntry",
        "ServiceEntryList",
        "networking.istio.io/v1",
    ),
    (
        "/apis/security.istio.io/v1/authorizationpolicies",
        "AuthorizationPolicy",
        "AuthorizationPolicyList",
        "security.istio.io/v1",
    ),
    (
        "/apis/security.istio.io/v1/peerauthentications",
        "PeerAuthentication",
        "PeerAuthenticationList",
        "security.istio.io/v1",
    ),
    (
        "/apis/networking.istio.io/v1/virtualservices",
        "VirtualService",
        "VirtualServiceList",
        "networking.istio.io/v1",
    ),
    (
        "/apis/networking.istio.io/v1/destinationrules",
        "DestinationRule",
        "DestinationRuleList",
        "networking.istio.io/v1",
    ),
    (
        "/apis/networking.istio.io/v1/workloadentries",
        "WorkloadEntry",
        "WorkloadEntryList",
        "networking.istio.io/v1",
    ),
    (
        "/apis/gateway.networking.k8s.io/v1/httproutes",
        "HTTPRoute",
        "HTTPRouteList",
        "gateway.networking.k8s.io/v1",
    ),
    (
        "/apis/gateway.networking.k8s.io/v1beta1/referencegrants",
        "ReferenceGrant",
        "ReferenceGrantList",
        "gateway.networking.k8s.io/v1beta1",
    ),
];

/// A request path as (collection path, namespace, name): `/api/v1/namespaces/NS/secrets`
/// is the `secrets` collection limited to NS, `/apis/G/V/namespaces/NS/leases/L` the
/// object L in it, `/api/v1/namespaces/NS` the Namespace NS.
fn collection(path: &str) -> (String, Option<String>, Option<String>) {
    let (base, rest) = match path.strip_prefix("/api/v1/") {
        Some(rest) => ("/api/v1".to_owned(), rest),
        None => {
            let mut parts = path.strip_prefix("/apis/").unwrap_or_default().splitn(3, '/');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(g), Some(v), Some(rest)) => (format!("/apis/{g}/{v}"), rest),
                _ => return (path.to_owned(), None, None),
            }
        }
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let owned = |s: &&str| Some((*s).to_owned());
    match segments.as_slice() {
        ["namespaces", ns, plural] => (format!("{base}/{plural}"), owned(ns), None),
        ["namespaces", ns, plural, name] => (format!("{base}/{plural}"), owned(ns), owned(name)),
        [plural] => (format!("{base}/{plural}"), None, None),
        [plural, name] => (format!("{base}/{plural}"), None, owned(name)),
        _ => (path.to_owned(), None, None),
    }
}

/// A `Status` answer, as kube-apiserver sends for errors.
fn status(code: u16, reason: &str, message: String) -> Response<BoxBody<Bytes, Infallible>> {
    json_response(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// Whether an object matches a `k=v[,k=v]` label selector (URL-encoded as sent).
fn selected(obj: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector else { return true };
    let sel = sel
        .replace("%2F", "/")
        .replace("%2f", "/")
        .replace("%3D", "=")
        .replace("%3d", "=")
        .replace("%2C", ",");
    sel.split(',')
        .filter(|t| !t.is_empty())
        .all(|term| match term.split_once('=') {
            Some((k, v)) => obj["metadata"]["labels"][k].as_str() == Some(v),
            None => obj["metadata"]["labels"].get(term).is_some(),
        })
}

#[derive(Default)]
struct State {
    rv: u64,
    /// (path, namespace, name) → object with its resourceVersion.
    objects: BTreeMap<(String, String, String), Value>,
    /// Every change: (rv, path, type, object).
    log: Vec<(u64, String, &'static str, Value)>,
    /// Watches from a version below this get 410.
    compacted: u64,
    /// Bumped to end every open watch.
    generation: u64,
    /// Counters a test asserts on.
    lists: u64,
    gone: u64,
    bookmarks: u64,
    /// Token → who it is, for TokenReview.
    tokens: BTreeMap<String, TokenOwner>,
    /// TokenReviews answered.
    reviews: u64,
    /// While set, TokenReviews get no answer (an API server that hangs).
    stall_reviews: bool,
    /// Whether the CRD kinds are served.
    crds: bool,
    /// Kinds the client's role may not read: every request for them gets `403`.
    forbidden: std::collections::BTreeSet<String>,
    /// While set, every request gets `503` (an API server that is down behind its load balancer).
    unavailable: bool,
    /// Writes received (POST, PUT, DELETE of objects), whatever their answer: (bearer
    /// token of the writer, "METHOD Kind").
    writes: Vec<(String, String)>,
}

/// Whom a registered token authenticates as.
#[derive(Clone)]
struct TokenOwner {
    username: String,
    groups: Vec<String>,
    /// The token's `aud` claim.
    audiences: Vec<String>,
    /// Whether the authenticator checks `spec.audiences` (kube-apiserver's service-account
    /// authenticator does; a careless webhook authenticator may not).
    audience_aware: bool,
}

/// The audience kube-apiserver assumes when a review names none.
const API_SERVER_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// The fake API server.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    changed: broadcast::Sender<()>,
    pub addr: SocketAddr,
}

impl FakeApi {
    pub async fn start() -> FakeApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (changed, _) = broadcast::channel(1024);
        let api = FakeApi {
            state: Arc::default(),
            changed,
            addr,
        };
        let server = api.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let api = server.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let api = api.clone();
                        async move {
                            if api.state.lock().unwrap().unavailable {
                                return Ok::<_, Infallible>(status(503, "ServiceUnavailable", "unavailable".into()));
                            }
                            if req.method() == hyper::Method::POST && req.uri().path() == TOKEN_REVIEWS {
                                return Ok::<_, Infallible>(api.token_review(req).await);
                            }
                            if req.method() != hyper::Method::GET {
                                return Ok::<_, Infallible>(api.write(req).await);
                            }
                            Ok::<_, Infallible>(api.handle(req))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        api
    }

    /// A kubeconfig that points at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: 'http://{}'}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n\
             current-context: fake\n",
            self.addr
        )
    }

    fn path_of(kind: &str) -> &'static str {
        KINDS
            .iter()
            .chain(CRD_KINDS)
            .find(|k| k.1 == kind)
            .unwrap_or_else(|| panic!("unserved kind {kind}"))
            .0
    }

    /// Creates or replaces an object (its `kind` picks the collection).
    pub fn apply(&self, mut obj: Value) {
        let path = Self::path_of(obj["kind"].as_str().unwrap()).to_owned();
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or_default().to_owned();
        let name = obj["metadata"]["name"].as_str().unwrap().to_owned();
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        let key = (path.clone(), ns, name);
        let ty = if s.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.objects.insert(key, obj.clone());
        let rv = s.rv;
        s.log.push((rv, path, ty, obj));
        drop(s);
        let _ = self.changed.send(());
    }

    /// Answers `403 Forbidden` to every request for `kind`, as RBAC that does not grant it.
    pub fn forbid(&self, kind: &str) {
        self.state.lock().unwrap().forbidden.insert(kind.to_owned());
    }

    /// While `down`, every request is answered `503` and open watches are cut.
    pub fn set_unavailable(&self, down: bool) {
        self.state.lock().unwrap().unavailable = down;
        if down {
            self.drop_watches();
        }
    }

    /// Serves the CRD kinds from now on (MCS ServiceExport/ServiceImport, Istio's networking
    /// and security kinds, Gateway API HTTPRoute and ReferenceGrant).
    pub fn install_crds(&self) {
        self.state.lock().unwrap().crds = true;
    }

    /// The object `ns/name` of `kind`, if there is one.
    pub fn object(&self, kind: &str, ns: &str, name: &str) -> Option<Value> {
        let key = (Self::path_of(kind).to_owned(), ns.to_owned(), name.to_owned());
        self.state.lock().unwrap().objects.get(&key).cloned()
    }

    /// Every object of `kind`.
    pub fn objects(&self, kind: &str) -> Vec<Value> {
        let path = Self::path_of(kind);
        let s = self.state.lock().unwrap();
        s.objects
            .iter()
            .filter(|(k, _)| k.0 == path)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The object writes received so far from the client with bearer `token`, as
    /// "METHOD Kind" ("POST ServiceEntry", "PUT Lease"…).
    pub fn writes_by(&self, token: &str) -> Vec<String> {
        let s = self.state.lock().unwrap();
        s.writes
            .iter()
            .filter(|(t, _)| t == token)
            .map(|(_, w)| w.clone())
            .collect()
    }

    /// A kubeconfig that points at this server and authenticates with bearer `token`.
    pub fn kubeconfig_with_token(&self, token: &str) -> String {
        self.kubeconfig()
            .replace("user: {}", &format!("user: {{token: {token}}}"))
    }

    /// The served kind at a collection path: (kind, apiVersion).
    fn served(&self, path: &str) -> Option<(&'static str, &'static str, &'static str)> {
        let crds = self.state.lock().unwrap().crds;
        KINDS
            .iter()
            .chain(CRD_KINDS.iter().filter(|_| crds))
            .find(|k| k.0 == path)
            .map(|k| (k.1, k.2, k.3))
    }

    /// POST (create), PUT (replace) and DELETE of one object.
    async fn write(&self, req: Request<Incoming>) -> Response<BoxBody<Bytes, Infallible>> {
        let method = req.method().clone();
        let token = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim_start_matches("Bearer ").to_owned())
            .unwrap_or_default();
        let (path, namespace, name) = collection(req.uri().path());
        let Some((kind, _, api_version)) = self.served(&path) else {
            return status(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            );
        };
        let Ok(body) = req.into_body().collect().await else {
            return status(400, "BadRequest", "unreadable body".into());
        };
        let body = body.to_bytes();
        let body: Value = if body.is_empty() {
            json!({})
        } else {
            match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return status(400, "BadRequest", format!("body is not JSON: {e}")),
            }
        };
        let mut s = self.state.lock().unwrap();
        s.writes.push((token, format!("{method} {kind}")));
        let ns = namespace.clone().unwrap_or_default();
        let (ty, answer, code) = match (method, name) {
            (hyper::Method::POST, None) => {
                let mut obj = body;
                if obj["kind"] != kind || obj["apiVersion"] != api_version {
                    return status(400, "BadRequest", format!("expected {api_version} {kind}, got {obj}"));
                }
                let Some(name) = obj["metadata"]["name"].as_str().map(str::to_owned) else {
                    return status(422, "Invalid", "metadata.name: Required value".into());
                };
                let namespace_key = ("/api/v1/namespaces".to_owned(), String::new(), ns.clone());
                if namespace.is_some() && !s.objects.contains_key(&namespace_key) {
                    return status(404, "NotFound", format!("namespaces \"{ns}\" not found"));
                }
                let key = (path.clone(), ns.clone(), name.clone());
                if s.objects.contains_key(&key) {
                    return status(409, "AlreadyExists", format!("{kind} \"{name}\" already exists"));
                }
                s.rv += 1;
                obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                obj["metadata"]["uid"] = json!(format!("uid-{}", s.rv));
                if namespace.is_some() {
                    obj["metadata"]["namespace"] = json!(ns);
                }
                s.objects.insert(key, obj.clone());
                ("ADDED", obj, 201)
            }
            (hyper::Method::PUT, Some(name)) => {
                let key = (path.clone(), ns.clone(), name.clone());
                let Some(current) = s.objects.get(&key) else {
                    return status(404, "NotFound", format!("{kind} \"{name}\" not found"));
                };
                let mut obj = body;
                let sent = obj["metadata"]["resourceVersion"].as_str();
                if sent.is_some_and(|rv| Some(rv) != current["metadata"]["resourceVersion"].as_str()) {
                    return status(
                        409,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on {kind} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                        ),
                    );
                }
                let uid = current["metadata"]["uid"].clone();
                s.rv += 1;
                obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                obj["metadata"]["uid"] = uid;
                s.objects.insert(key, obj.clone());
                ("MODIFIED", obj, 200)
            }
            (hyper::Method::DELETE, Some(name)) => {
                let key = (path.clone(), ns.clone(), name.clone());
                let Some(current) = s.objects.get(&key) else {
                    return status(404, "NotFound", format!("{kind} \"{name}\" not found"));
                };
                let pre = &body["preconditions"];
                let holds = |field: &str| {
                    pre[field]
                        .as_str()
                        .is_none_or(|want| current["metadata"][field].as_str() == Some(want))
                };
                if !holds("resourceVersion") || !holds("uid") {
                    return status(409, "Conflict", format!("Precondition failed for {kind} \"{name}\""));
                }
                let mut obj = s.objects.remove(&key).unwrap();
                s.rv += 1;
                obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                ("DELETED", obj, 200)
            }
            (m, _) => return status(405, "MethodNotAllowed", format!("{m} is not served here")),
        };
        let rv = s.rv;
        s.log.push((rv, path, ty, answer.clone()));
        drop(s);
        let _ = self.changed.send(());
        json_response(code, answer)
    }

    /// Deletes an object.
    pub fn delete(&self, kind: &str, ns: &str, name: &str) {
        let path = Self::path_of(kind).to_owned();
        let mut s = self.state.lock().unwrap();
        let Some(mut obj) = s.objects.remove(&(path.clone(), ns.to_owned(), name.to_owned())) else {
            return;
        };
        s.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        let rv = s.rv;
        s.log.push((rv, path, "DELETED", obj));
        drop(s);
        let _ = self.changed.send(());
    }

    /// Forgets all history, as an API server whose watch cache restarted: a watch
    /// resuming from any version handed out so far, even the latest, gets 410 Gone.
    pub fn forget_history(&self) {
        let mut s = self.state.lock().unwrap();
        s.compacted = s.rv + 1;
        s.log.clear();
    }

    /// Ends every open watch, as an API server restart or a load balancer would.
    pub fn drop_watches(&self) {
        self.state.lock().unwrap().generation += 1;
        let _ = self.changed.send(());
    }

    /// (lists served, 410s sent, bookmarks sent).
    pub fn counters(&self) -> (u64, u64, u64) {
        let s = self.state.lock().unwrap();
        (s.lists, s.gone, s.bookmarks)
    }

    /// Registers a bound token of the service account `NS/SA` minted for `audiences`.
    pub fn add_service_account_token(&self, token: &str, ns: &str, sa: &str, audiences: &[&str]) {
        self.add_token(
            token,
            TokenOwner {
                username: format!("system:serviceaccount:{ns}:{sa}"),
                groups: vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{ns}"),
                    "system:authenticated".into(),
                ],
                audiences: audiences.iter().map(|a| a.to_string()).collect(),
                audience_aware: true,
            },
        );
    }

    /// Registers a token of `username`, a user that is no service account.
    pub fn add_user_token(&self, token: &str, username: &str, audiences: &[&str]) {
        self.add_token(
            token,
            TokenOwner {
                username: username.into(),
                groups: vec!["system:authenticated".into()],
                audiences: audiences.iter().map(|a| a.to_string()).collect(),
                audience_aware: true,
            },
        );
    }

    /// Registers a service-account token checked by an authenticator that ignores
    /// `spec.audiences`: it authenticates whatever the review asks for and answers with the
    /// token's own audiences.
    pub fn add_audience_unaware_token(&self, token: &str, ns: &str, sa: &str, audiences: &[&str]) {
        self.add_token(
            token,
            TokenOwner {
                username: format!("system:serviceaccount:{ns}:{sa}"),
                groups: vec!["system:serviceaccounts".into(), "system:authenticated".into()],
                audiences: audiences.iter().map(|a| a.to_string()).collect(),
                audience_aware: false,
            },
        );
    }

    fn add_token(&self, token: &str, owner: TokenOwner) {
        self.state.lock().unwrap().tokens.insert(token.to_owned(), owner);
    }

    /// TokenReviews answered so far.
    pub fn token_reviews(&self) -> u64 {
        self.state.lock().unwrap().reviews
    }

    /// While `stall`, TokenReviews hang without an answer.
    pub fn stall_token_reviews(&self, stall: bool) {
        self.state.lock().unwrap().stall_reviews = stall;
        let _ = self.changed.send(());
    }

    async fn token_review(&self, req: Request<Incoming>) -> Response<BoxBody<Bytes, Infallible>> {
        let bad = |message: String| {
            json_response(
                400,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "BadRequest",
                    "message": message, "code": 400}),
            )
        };
        let mut changed = self.changed.subscribe();
        let Ok(body) = req.into_body().collect().await else {
            return bad("unreadable body".into());
        };
        let Ok(review) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
            return bad("body is not JSON".into());
        };
        if review["kind"] != "TokenReview" || review["apiVersion"] != "authentication.k8s.io/v1" {
            return bad(format!(
                "expected an authentication.k8s.io/v1 TokenReview, got {review}"
            ));
        }
        let Some(token) = review["spec"]["token"].as_str().filter(|t| !t.is_empty()) else {
            return bad("spec.token: Required value".into());
        };
        let mut wanted: Vec<String> = review["spec"]["audiences"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        if wanted.is_empty() {
            wanted.push(API_SERVER_AUDIENCE.into());
        }
        while self.state.lock().unwrap().stall_reviews {
            if let Err(broadcast::error::RecvError::Closed) = changed.recv().await {
                return bad("shutting down".into());
            }
        }
        let owner = {
            let mut s = self.state.lock().unwrap();
            s.reviews += 1;
            s.tokens.get(token).cloned()
        };
        let status = match owner {
            None => json!({"user": {}, "error": "[invalid bearer token, token lookup failed]"}),
            Some(o) if !o.audience_aware => json!({"authenticated": true, "audiences": o.audiences,
                "user": {"username": o.username, "groups": o.groups}}),
            Some(o) => {
                let shared: Vec<&String> = o.audiences.iter().filter(|a| wanted.contains(a)).collect();
                if shared.is_empty() {
                    json!({"user": {}, "error": format!("[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]", o.audiences, wanted)})
                } else {
                    json!({"authenticated": true, "audiences": shared,
                        "user": {"username": o.username, "uid": "0b1d5c3e", "groups": o.groups}})
                }
            }
        };
        let mut answer = review.clone();
        answer["metadata"] = json!({"creationTimestamp": null});
        answer["status"] = status;
        json_response(201, answer)
    }

    fn handle(&self, req: Request<Incoming>) -> Response<BoxBody<Bytes, Infallible>> {
        let (path, namespace, name) = collection(req.uri().path());
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        // Authorization comes first, as in kube-apiserver: a forbidden kind is 403 installed or not.
        if let Some(k) = KINDS.iter().chain(CRD_KINDS).find(|k| k.0 == path)
            && self.state.lock().unwrap().forbidden.contains(k.1)
        {
            return status(403, "Forbidden", format!("{} is forbidden for this user", k.1));
        }
        let Some((kind, list_kind, api_version)) = self.served(&path) else {
            return json_response(
                404,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}),
            );
        };
        if let Some(name) = name {
            let key = (path, namespace.unwrap_or_default(), name.clone());
            return match self.state.lock().unwrap().objects.get(&key) {
                Some(obj) => json_response(200, obj.clone()),
                None => status(404, "NotFound", format!("{kind} \"{name}\" not found")),
            };
        }
        if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
            let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
            let selector = query.get("labelSelector").cloned();
            return self.watch(WatchRequest {
                path,
                kind,
                api_version,
                from,
                bookmarks,
                namespace,
                selector,
            });
        }
        let mut s = self.state.lock().unwrap();
        s.lists += 1;
        let selector = query.get("labelSelector");
        let items: Vec<Value> = s
            .objects
            .iter()
            .filter(|(k, v)| k.0 == path && namespace.as_ref().is_none_or(|ns| *ns == k.1) && selected(v, selector))
            .map(|(_, v)| v.clone())
            .collect();
        json_response(
            200,
            json!({"kind": list_kind, "apiVersion": api_version, "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
        )
    }

    fn watch(&self, w: WatchRequest) -> Response<BoxBody<Bytes, Infallible>> {
        let WatchRequest {
            path,
            kind,
            api_version,
            from,
            bookmarks,
            namespace,
            selector,
        } = w;
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let line = |v: Value| Bytes::from(format!("{v}\n"));
        {
            let mut s = self.state.lock().unwrap();
            if from < s.compacted {
                s.gone += 1;
                let status = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}});
                let _ = tx.try_send(line(status));
                drop(tx);
                return stream_response(rx);
            }
        }
        let state = self.state.clone();
        let mut changed = self.changed.subscribe();
        tokio::spawn(async move {
            let (mut sent, generation) = (from, state.lock().unwrap().generation);
            let mut bookmarked = false;
            loop {
                let (events, rv, ended) = {
                    let mut s = state.lock().unwrap();
                    let events: Vec<Value> = s
                        .log
                        .iter()
                        .filter(|(rv, p, _, _)| *rv > sent && *p == path)
                        .filter(|(_, _, _, o)| {
                            namespace
                                .as_ref()
                                .is_none_or(|ns| o["metadata"]["namespace"].as_str() == Some(ns))
                                && selected(o, selector.as_ref())
                        })
                        .map(|(_, _, ty, o)| json!({"type": ty, "object": o}))
                        .collect();
                    if bookmarks && !bookmarked {
                        s.bookmarks += 1;
                    }
                    (events, s.rv, s.generation != generation)
                };
                if ended {
                    return;
                }
                for e in events {
                    if tx.send(line(e)).await.is_err() {
                        return;
                    }
                }
                sent = rv;
                if bookmarks && !bookmarked {
                    bookmarked = true;
                    let b = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": rv.to_string()}}});
                    if tx.send(line(b)).await.is_err() {
                        return;
                    }
                }
                if changed.recv().await.is_err() {
                    return;
                }
            }
        });
        stream_response(rx)
    }
}

/// What a watch asks for.
struct WatchRequest {
    path: String,
    kind: &'static str,
    api_version: &'static str,
    from: u64,
    bookmarks: bool,
    namespace: Option<String>,
    selector: Option<String>,
}

fn json_response(code: u16, v: Value) -> Response<BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap()
}

fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response<BoxBody<Bytes, Infallible>> {
    let body = StreamBody::new(ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b))));
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(body.boxed())
        .unwrap()
}

/// A remote secret as `istioctl create-remote-secret` makes it: in `istio-system`, labelled
/// `istio/multiCluster: "true"`, a data key per cluster whose value is its kubeconfig.
pub fn remote_secret(name: &str, clusters: &[(&str, &FakeApi)]) -> Value {
    use base64::Engine;
    let data: serde_json::Map<String, Value> = clusters
        .iter()
        .map(|(c, api)| {
            let kubeconfig = base64::engine::general_purpose::STANDARD.encode(api.kubeconfig());
            (c.to_string(), json!(kubeconfig))
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": name, "namespace": "istio-system", "labels": {"istio/multiCluster": "true"}},
           "data": data})
}
