//! `kind-clusters/` checked without a cluster: nothing there can run on this project's
//! machines (no Docker engine), so this catches here what a user would otherwise hit at
//! `kubectl apply` time, or later in a crash-looping pod.
//!
//! - Every document of every `kind-clusters/manifests/*.yaml`, with its placeholders
//!   filled as `up.sh` fills them, parses into its typed k8s-openapi struct by `kind`
//!   (an unknown kind fails), and has no field the type does not know (see
//!   [`unknown_fields`] for how).
//! - Every placeholder is one `up.sh` fills (its `envsubst` variable lists).
//! - Cross-references: each Isthmus container's subcommand and flags are accepted by our
//!   binaries (run with the same arguments and `--help`, which makes clap check every
//!   flag and value and then stop), its env names what its `--help` reads; file paths in
//!   its arguments lie under its mounts; Deployment selectors match their pod labels,
//!   Service selectors match a Deployment and target declared container ports;
//!   service accounts, roles and secrets referred to exist (in the manifests, or made by
//!   `up.sh`); the gateway Service exposes 15443 with the network label; the remote
//!   secret carries `istio/multiCluster` and a kubeconfig kube accepts.
//! - The kind configs' pod and service subnets are distinct and do not overlap.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Namespace, PodSpec, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_vocab::manifest::{documents, typed};
use serde_json::Value;

fn kind_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("kind-clusters")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What up.sh puts in the placeholders, for one cluster (cluster2, so that the remote
/// secret's cluster differs from it), as realistic as the script's values.
fn values() -> BTreeMap<&'static str, String> {
    let mut v: BTreeMap<&'static str, String> = [
        ("CLUSTER", "cluster2"),
        ("NETWORK", "network2"),
        ("GATEWAY_IP", "172.18.0.3"),
        ("REMOTE", "cluster1"),
        ("KUBE_CLUSTER", "cluster1"),
        ("KUBE_SERVER", "https://172.18.0.2:6443"),
        ("KUBE_TOKEN", "eyJhbGciOiJSUzI1NiIsImtpZCI6IiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6aXN0aW8tc3lzdGVtOmlzdGhtdXMtcmVhZGVyIn0.c2lnbmF0dXJl"),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_owned()))
    .collect();
    // base64 of a PEM, as in a service-account token Secret's ca.crt.
    v.insert(
        "KUBE_CA_DATA",
        base64::engine::general_purpose::STANDARD
            .encode("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"),
    );
    let kubeconfig = substitute(&kind_dir().join("kubeconfig.yaml"), &v);
    v.insert(
        "REMOTE_KUBECONFIG_B64",
        base64::engine::general_purpose::STANDARD.encode(kubeconfig),
    );
    v
}

/// The `${NAME}`s in `text`.
fn placeholders(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        let after = &rest[i + 2..];
        let end = after.find('}').unwrap_or(after.len());
        out.insert(after[..end].to_owned());
        rest = &after[end..];
    }
    out
}

/// `file`'s text with its placeholders filled from `values`; a placeholder without a
/// value fails (up.sh would leave it in place, or fill it with nothing).
fn substitute(file: &Path, values: &BTreeMap<&'static str, String>) -> String {
    let mut text = read(file);
    for name in placeholders(&text) {
        let value = values
            .get(name.as_str())
            .unwrap_or_else(|| panic!("{}: placeholder ${{{name}}} has no value", file.display()));
        text = text.replace(&format!("${{{name}}}"), value);
    }
    text
}

/// The variables up.sh's `envsubst '${A} ${B}'` calls fill.
fn script_variables(script: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in script.match_indices("envsubst '") {
        let list = &script[i + "envsubst '".len()..];
        let list = &list[..list.find('\'').expect("closing quote")];
        out.extend(placeholders(list));
    }
    out
}

/// Unknown fields, found by comparing the document as written with the re-serialization
/// of its typed value. k8s-openapi's deserializers skip fields they do not know (as the
/// API server's non-strict decoding does), so a misspelt or misplaced field would parse
/// and silently do nothing; re-serializing keeps exactly what the type understood, so any
/// key of the original missing from it was dropped. Explicit nulls (an empty YAML value)
/// are allowed to vanish; any value that changed on the way (which would mean the type
/// reads it differently from how it is written) is reported too.
fn unknown_fields(path: &str, written: &Value, understood: &Value, out: &mut Vec<String>) {
    match (written, understood) {
        (Value::Object(w), Value::Object(u)) => {
            for (k, wv) in w {
                match u.get(k) {
                    Some(uv) => unknown_fields(&format!("{path}.{k}"), wv, uv, out),
                    None if wv.is_null() => {}
                    None => out.push(format!("unknown field {path}.{k}")),
                }
            }
        }
        (Value::Array(w), Value::Array(u)) if w.len() == u.len() => {
            for (i, (wv, uv)) in w.iter().zip(u).enumerate() {
                unknown_fields(&format!("{path}[{i}]"), wv, uv, out);
            }
        }
        (w, u) if w == u => {}
        (w, u) => out.push(format!("{path}: written {w}, read as {u}")),
    }
}

#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    deployments: Vec<(String, Deployment)>,
    services: Vec<Service>,
    secrets: Vec<Secret>,
}

fn parse_as<T>(file: &Path, n: usize, value: Value, errors: &mut Vec<String>) -> Option<T>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    match typed::<T>(file, n, "", value.clone()) {
        Ok(t) => {
            let back = serde_json::to_value(&t).expect("k8s-openapi values serialize");
            let mut unknown = Vec::new();
            unknown_fields("", &value, &back, &mut unknown);
            for u in unknown {
                errors.push(format!("{}: document {n}: {u}", file.display()));
            }
            Some(t)
        }
        Err(e) => {
            errors.push(e.to_string());
            None
        }
    }
}

fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(kind_dir().join("manifests"))
        .expect("kind-clusters/manifests")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "expected the manifests, found {files:?}");
    files
}

fn load() -> Objects {
    let values = values();
    let mut o = Objects::default();
    let mut errors = Vec::new();
    for file in manifest_files() {
        let text = substitute(&file, &values);
        let docs = documents(&file, &text).unwrap_or_else(|e| panic!("{e}"));
        assert!(!docs.is_empty(), "{}: no documents", file.display());
        for (n, value) in docs {
            let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned();
            let f = &file;
            let e = &mut errors;
            match kind.as_str() {
                "Namespace" => o.namespaces.extend(parse_as(f, n, value, e)),
                "ServiceAccount" => o.service_accounts.extend(parse_as(f, n, value, e)),
                "ClusterRole" => o.cluster_roles.extend(parse_as(f, n, value, e)),
                "ClusterRoleBinding" => o.cluster_role_bindings.extend(parse_as(f, n, value, e)),
                "Role" => o.roles.extend(parse_as(f, n, value, e)),
                "RoleBinding" => o.role_bindings.extend(parse_as(f, n, value, e)),
                "Deployment" => {
                    let name = file.file_name().unwrap().to_string_lossy().into_owned();
                    o.deployments
                        .extend(parse_as::<Deployment>(f, n, value, e).map(|d| (name, d)));
                }
                "Service" => o.services.extend(parse_as(f, n, value, e)),
                "Secret" => o.secrets.extend(parse_as(f, n, value, e)),
                other => errors.push(format!("{}: document {n}: unknown kind {other:?}", file.display())),
            }
        }
    }
    assert!(
        errors.is_empty(),
        "manifests do not fit the Kubernetes types:\n{}",
        errors.join("\n")
    );
    o
}

fn name_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().expect("every object is named"),
    )
}

fn pod_spec(d: &Deployment) -> &PodSpec {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("a pod template")
}

fn pod_labels(d: &Deployment) -> BTreeMap<String, String> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// DNS-1123 label (Service names and the like) and Kubernetes label values.
fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric())
}

fn isthmus_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe.parent().and_then(|d| d.parent()).expect("target dir").join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace` (scripts/test.sh does)",
        path.display()
    );
    path
}

fn help_of(bin: &Path, sub: Option<&str>) -> String {
    let out = Command::new(bin).args(sub).arg("--help").output().unwrap();
    assert!(out.status.success(), "{} {sub:?} --help failed", bin.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `--flags` a help text names.
fn flags_in(help: &str) -> BTreeSet<String> {
    help.split_whitespace()
        .filter(|t| t.starts_with("--"))
        .map(|t| {
            t.trim_end_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .to_owned()
        })
        .collect()
}

/// Checks one container of our image against our binaries; returns its problems.
fn check_isthmus_container(where_: &str, c: &Container) -> Vec<String> {
    let mut problems = Vec::new();
    let command = c.command.clone().unwrap_or_default();
    let args = c.args.clone().unwrap_or_default();
    let [program] = command.as_slice() else {
        return vec![format!("{where_}: command must be one of our binaries, is {command:?}")];
    };
    let sub = match program.as_str() {
        "federation-controller" | "sidecar" => match args.first() {
            Some(s) => Some(s.as_str()),
            None => return vec![format!("{where_}: {program} needs a subcommand")],
        },
        "eastwest-gateway" => None,
        other => return vec![format!("{where_}: {other} is not a binary of isthmus:dev")],
    };
    if c.image_pull_policy.as_deref() != Some("Never") {
        problems.push(format!(
            "{where_}: isthmus:dev is loaded by `kind load`, so imagePullPolicy must be Never"
        ));
    }
    let bin = isthmus_binary(program);
    let help = help_of(&bin, sub);
    let known = flags_in(&help);
    let flag_args = if sub.is_some() { &args[1..] } else { &args[..] };
    for a in flag_args.iter().filter(|a| a.starts_with("--")) {
        let flag = a.split('=').next().unwrap();
        if !known.contains(flag) {
            problems.push(format!(
                "{where_}: `{program} {}` has no flag {flag}",
                sub.unwrap_or("")
            ));
        }
    }
    // The same arguments and --help: clap checks every flag and parses every value
    // (addresses, durations, enums) before it stops at --help.
    let out = Command::new(&bin).args(&args).arg("--help").output().unwrap();
    if !out.status.success() {
        problems.push(format!(
            "{where_}: {program} refuses its arguments: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    for e in c.env.iter().flatten() {
        if e.name != "RUST_LOG" && !help.contains(&format!("[env: {}=", e.name)) {
            problems.push(format!(
                "{where_}: env {} is read by nothing in `{program} --help`",
                e.name
            ));
        }
    }
    // Absolute paths in the arguments (a flag's value, or after `CLUSTER=`) must lie under
    // one of the container's mounts: otherwise the file is not there at run time.
    let mounts: Vec<String> = c.volume_mounts.iter().flatten().map(|m| m.mount_path.clone()).collect();
    for a in &args {
        let path = a.rsplit('=').next().unwrap();
        if path.starts_with('/') && !mounts.iter().any(|m| Path::new(path).starts_with(m)) {
            problems.push(format!("{where_}: {path} is under none of its mounts {mounts:?}"));
        }
    }
    problems
}

/// Whether `c` runs `sidecar SUB`.
fn runs(c: &Container, sub: &str) -> bool {
    c.command.as_deref() == Some(&["sidecar".to_owned()][..])
        && c.args.as_ref().and_then(|a| a.first()).map(String::as_str) == Some(sub)
}

/// The `[default: …]` of `flag` in a help text.
fn default_of(help: &str, flag: &str) -> Option<String> {
    let start = help.lines().position(|l| l.trim_start().starts_with(flag))?;
    let mut lines = help.lines().skip(start);
    let mut section = lines.next()?.to_owned();
    for l in lines.take_while(|l| !l.trim_start().starts_with('-')) {
        section.push_str(l);
    }
    let (_, rest) = section.split_once("[default: ")?;
    Some(rest.split(']').next()?.to_owned())
}

fn arg_after<'a>(c: &'a Container, flag: &str) -> Option<&'a str> {
    let args = c.args.as_deref()?;
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).map(String::as_str)
}

fn port_of(addr: &str) -> i32 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn manifests_parse_into_the_kubernetes_types_and_fit_together() {
    let o = load();
    let values = values();
    let up = read(&kind_dir().join("up.sh"));
    let mut problems = Vec::new();

    // Every placeholder is one up.sh fills.
    let filled = script_variables(&up);
    let mut templates = manifest_files();
    templates.push(kind_dir().join("kubeconfig.yaml"));
    for f in &templates {
        for p in placeholders(&read(f)) {
            if !filled.contains(&p) {
                problems.push(format!(
                    "{}: ${{{p}}} is not in any of up.sh's envsubst lists",
                    f.display()
                ));
            }
        }
    }

    // Names and labels valid once filled.
    let metas = o
        .namespaces
        .iter()
        .map(|x| &x.metadata)
        .chain(o.service_accounts.iter().map(|x| &x.metadata))
        .chain(o.deployments.iter().map(|(_, x)| &x.metadata))
        .chain(o.services.iter().map(|x| &x.metadata))
        .chain(o.secrets.iter().map(|x| &x.metadata))
        .chain(
            o.deployments
                .iter()
                .filter_map(|(_, d)| d.spec.as_ref()?.template.metadata.as_ref()),
        );
    for m in metas {
        if let Some(n) = &m.name
            && !dns_label(n)
        {
            problems.push(format!("name {n:?} is not a DNS-1123 label"));
        }
        for (k, v) in m.labels.iter().flatten() {
            if !label_value(v) {
                problems.push(format!("label {k}={v:?}: not a valid label value"));
            }
        }
    }

    let sas: BTreeSet<(String, String)> = o.service_accounts.iter().map(|s| name_of(&s.metadata)).collect();
    let secrets: BTreeSet<(String, String)> = o.secrets.iter().map(|s| name_of(&s.metadata)).collect();
    let cluster_roles: BTreeSet<String> = o.cluster_roles.iter().map(|r| name_of(&r.metadata).1).collect();
    let roles: BTreeSet<(String, String)> = o.roles.iter().map(|r| name_of(&r.metadata)).collect();

    for b in &o.cluster_role_bindings {
        if b.role_ref.kind != "ClusterRole" || !cluster_roles.contains(&b.role_ref.name) {
            problems.push(format!(
                "ClusterRoleBinding {:?}: no ClusterRole {}",
                b.metadata.name, b.role_ref.name
            ));
        }
        for s in b.subjects.iter().flatten() {
            if !sas.contains(&(s.namespace.clone().unwrap_or_default(), s.name.clone())) {
                problems.push(format!(
                    "ClusterRoleBinding {:?}: no ServiceAccount {}",
                    b.metadata.name, s.name
                ));
            }
        }
    }
    for b in &o.role_bindings {
        let (ns, name) = name_of(&b.metadata);
        if !roles.contains(&(ns.clone(), b.role_ref.name.clone())) {
            problems.push(format!("RoleBinding {name}: no Role {} in {ns}", b.role_ref.name));
        }
        for s in b.subjects.iter().flatten() {
            if !sas.contains(&(s.namespace.clone().unwrap_or_default(), s.name.clone())) {
                problems.push(format!("RoleBinding {name}: no ServiceAccount {}", s.name));
            }
        }
    }
    // The controller may read what its sources watch.
    let readable: BTreeSet<String> = o
        .cluster_roles
        .iter()
        .flat_map(|r| r.rules.iter().flatten())
        .filter(|r| ["list", "watch"].iter().all(|v| r.verbs.iter().any(|x| x == v)))
        .flat_map(|r| r.resources.iter().flatten().cloned())
        .collect();
    for r in [
        "namespaces",
        "services",
        "endpointslices",
        "pods",
        "nodes",
        "serviceexports",
        "virtualservices",
        "destinationrules",
        "serviceentries",
        "workloadentries",
        "gateways",
        "authorizationpolicies",
        "peerauthentications",
        "httproutes",
        "referencegrants",
        "workloadentries",
    ] {
        if !readable.contains(r) {
            problems.push(format!("no ClusterRole lets the controller list and watch {r}"));
        }
    }

    for (file, d) in &o.deployments {
        let (ns, name) = name_of(&d.metadata);
        let where_ = format!("{file}: Deployment {ns}/{name}");
        let spec = d.spec.as_ref().unwrap();
        let selector = spec.selector.match_labels.clone().unwrap_or_default();
        let labels = pod_labels(d);
        if !matches(&selector, &labels) {
            problems.push(format!(
                "{where_}: selector {selector:?} does not select its pods {labels:?}"
            ));
        }
        let pod = pod_spec(d);
        let sa = pod.service_account_name.clone().unwrap_or("default".into());
        if sa != "default" && !sas.contains(&(ns.clone(), sa.clone())) {
            problems.push(format!("{where_}: no ServiceAccount {sa}"));
        }
        let volumes: BTreeMap<String, &k8s_openapi::api::core::v1::Volume> =
            pod.volumes.iter().flatten().map(|v| (v.name.clone(), v)).collect();
        for v in volumes.values() {
            if let Some(s) = v.secret.as_ref().and_then(|s| s.secret_name.clone())
                && !secrets.contains(&(ns.clone(), s.clone()))
                && !up.contains(&format!("secret generic {s}"))
                && !up.contains(&format!("secret generic \"{s}"))
                && !(s.starts_with("isthmus-workload-") && up.contains("secret generic \"isthmus-workload-$sa\""))
            {
                problems.push(format!(
                    "{where_}: Secret {s} is neither in the manifests nor made by up.sh"
                ));
            }
        }
        let containers: Vec<&Container> = pod.init_containers.iter().flatten().chain(&pod.containers).collect();
        for c in &containers {
            for m in c.volume_mounts.iter().flatten() {
                if !volumes.contains_key(&m.name) {
                    problems.push(format!(
                        "{where_}: container {} mounts undeclared volume {}",
                        c.name, m.name
                    ));
                }
            }
            if c.image.as_deref() == Some("isthmus:dev") {
                problems.extend(check_isthmus_container(&format!("{where_}: container {}", c.name), c));
            }
        }
        // A pod with a sidecar: Istio's labels, the init container's capabilities.
        let sidecar = containers.iter().find(|c| runs(c, "run"));
        if let Some(sc) = sidecar {
            for (k, v) in [
                ("security.istio.io/tlsMode", "istio"),
                ("topology.istio.io/network", values["NETWORK"].as_str()),
            ] {
                if labels.get(k).map(String::as_str) != Some(v) {
                    problems.push(format!("{where_}: pod label {k} must be {v}"));
                }
            }
            for k in ["app", "version"] {
                if !labels.contains_key(k) {
                    problems.push(format!("{where_}: pod label {k} missing"));
                }
            }
            let init = pod
                .init_containers
                .iter()
                .flatten()
                .find(|c| runs(c, "init") && c.args.iter().flatten().any(|a| a == "--apply"));
            match init {
                None => problems.push(format!(
                    "{where_}: a sidecar without `sidecar init --apply` captures nothing"
                )),
                Some(i) => {
                    let caps: BTreeSet<String> = i
                        .security_context
                        .as_ref()
                        .and_then(|s| s.capabilities.as_ref()?.add.clone())
                        .unwrap_or_default()
                        .into_iter()
                        .collect();
                    for cap in ["NET_ADMIN", "NET_RAW"] {
                        if !caps.contains(cap) {
                            problems.push(format!("{where_}: the init container needs {cap}"));
                        }
                    }
                    // The sidecar's control-plane connections carry no mark: the capture
                    // rules must leave their ports alone, or they loop into the sidecar.
                    let init_help = help_of(&isthmus_binary("sidecar"), Some("init"));
                    let ports_of = |flag: &str| -> BTreeSet<i32> {
                        arg_after(i, flag)
                            .map(str::to_owned)
                            .or_else(|| default_of(&init_help, flag))
                            .unwrap_or_default()
                            .split(',')
                            .filter_map(|p| p.trim().parse().ok())
                            .collect()
                    };
                    let out_excluded = ports_of("--exclude-outbound-ports");
                    for flag in ["--xds", "--ca-address"] {
                        if let Some(url) = arg_after(sc, flag)
                            && !out_excluded.contains(&port_of(url))
                        {
                            problems.push(format!(
                                "{where_}: the sidecar's {flag} {url} would be captured (excluded: {out_excluded:?})"
                            ));
                        }
                    }
                    // Kubelet's probes come from outside the pod: captured, they would meet
                    // STRICT mTLS and fail.
                    let in_excluded = ports_of("--exclude-inbound-ports");
                    for c in &pod.containers {
                        let probes = [&c.readiness_probe, &c.liveness_probe, &c.startup_probe];
                        for probe in probes.into_iter().flatten() {
                            let port = probe
                                .http_get
                                .as_ref()
                                .map(|h| h.port.clone())
                                .or_else(|| probe.tcp_socket.as_ref().map(|t| t.port.clone()));
                            if let Some(IntOrString::Int(p)) = port
                                && !in_excluded.contains(&p)
                            {
                                problems.push(format!(
                                    "{where_}: container {}'s probe on {p} would be captured into mTLS \
                                     (excluded: {in_excluded:?})",
                                    c.name
                                ));
                            }
                        }
                    }
                }
            }
            let id = arg_after(sc, "--identity").unwrap_or_default();
            if id != format!("spiffe://cluster.local/ns/{ns}/sa/{sa}") {
                problems.push(format!(
                    "{where_}: --identity {id} is not its service account's SPIFFE ID"
                ));
            }
            if !sc.env.iter().flatten().any(|e| {
                e.name == "INSTANCE_IP"
                    && e.value_from
                        .as_ref()
                        .and_then(|v| v.field_ref.as_ref())
                        .is_some_and(|f| f.field_path == "status.podIP")
            }) {
                problems.push(format!("{where_}: the sidecar needs INSTANCE_IP from status.podIP"));
            }
        }
    }

    // Addresses in our containers' arguments that name a Service (`NAME.NS.svc[:PORT]`,
    // with or without a scheme) name one of ours, on a port it exposes.
    for (file, d) in &o.deployments {
        let pod = pod_spec(d);
        for c in pod.init_containers.iter().flatten().chain(&pod.containers) {
            let args = c.args.clone().unwrap_or_default();
            // `--service` names a service for metrics and SNI, it connects nowhere.
            let none = String::new();
            let values = args.iter().zip(std::iter::once(&none).chain(&args));
            for (a, _) in values.filter(|(_, before)| *before != "--service") {
                let addr = a.split_once("://").map_or(a.as_str(), |(_, rest)| rest);
                let (host, port) = addr.rsplit_once(':').unwrap_or((addr, ""));
                let Some(base) = host
                    .strip_suffix(".svc")
                    .or_else(|| host.strip_suffix(".svc.cluster.local"))
                else {
                    continue;
                };
                let Some((name, ns)) = base.split_once('.') else {
                    continue;
                };
                let exposes = |s: &Service| {
                    port.is_empty()
                        || s.spec
                            .as_ref()
                            .unwrap()
                            .ports
                            .iter()
                            .flatten()
                            .any(|p| p.port.to_string() == port)
                };
                let found = o
                    .services
                    .iter()
                    .find(|s| s.metadata.name.as_deref() == Some(name) && s.metadata.namespace.as_deref() == Some(ns));
                if !found.is_some_and(exposes) {
                    problems.push(format!(
                        "{file}: container {}: {a}: no Service {ns}/{name} exposing {port}",
                        c.name
                    ));
                }
            }
        }
    }

    // Services: selectors select a Deployment's pods; target ports are declared.
    // The one known exception, stated in the README: the gateway Service's 15012.
    let exceptions = [("istio-eastwestgateway", 15012)];
    for s in &o.services {
        let (ns, name) = name_of(&s.metadata);
        let spec = s.spec.as_ref().unwrap();
        let selector = spec.selector.clone().unwrap_or_default();
        let backing: Vec<&Deployment> = o
            .deployments
            .iter()
            .map(|(_, d)| d)
            .filter(|d| d.metadata.namespace.as_deref() == Some(&ns) && matches(&selector, &pod_labels(d)))
            .collect();
        if backing.is_empty() {
            problems.push(format!(
                "Service {ns}/{name}: selector {selector:?} selects no Deployment's pods"
            ));
        }
        for p in spec.ports.iter().flatten() {
            let target = match &p.target_port {
                Some(IntOrString::Int(i)) => *i,
                Some(IntOrString::String(s)) => panic!("Service {name}: use numeric targetPorts here, not {s}"),
                None => p.port,
            };
            if exceptions.contains(&(name.as_str(), target)) {
                continue;
            }
            for d in &backing {
                let declared = pod_spec(d)
                    .containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .any(|cp| cp.container_port == target);
                if !declared {
                    problems.push(format!(
                        "Service {ns}/{name}: port {target} is declared by no container of {:?}",
                        d.metadata.name
                    ));
                }
            }
        }
    }

    assert!(
        problems.is_empty(),
        "kind-clusters/ does not fit together:\n{}",
        problems.join("\n")
    );

    let service = |ns: &str, name: &str| {
        o.services
            .iter()
            .find(|s| s.metadata.namespace.as_deref() == Some(ns) && s.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no Service {ns}/{name}"))
    };
    let ports = |s: &Service| -> BTreeSet<i32> {
        s.spec
            .as_ref()
            .unwrap()
            .ports
            .iter()
            .flatten()
            .map(|p| p.port)
            .collect()
    };

    // The east-west gateway, as the controller finds it: labelled with its network,
    // exposing 15443, at its externalIPs.
    let gw = service("istio-system", "istio-eastwestgateway");
    let gw_spec = gw.spec.as_ref().unwrap();
    assert_eq!(
        gw.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("topology.istio.io/network")),
        Some(&values["NETWORK"]),
        "the gateway Service must carry its network's label"
    );
    assert_eq!(gw_spec.type_.as_deref(), Some("LoadBalancer"));
    assert!(ports(gw).is_superset(&[15443, 15012, 15021].into()), "{:?}", ports(gw));
    assert_eq!(
        gw_spec.external_ips.as_deref(),
        Some(&[values["GATEWAY_IP"].clone()][..])
    );
    assert!(
        gw_spec
            .ports
            .iter()
            .flatten()
            .any(|p| p.port == 15443 && p.name.as_deref() == Some("tls")),
        "15443 is named tls, as Istio's"
    );

    // The controller: its Service is istiod (the name on its serving certificate), its
    // ports are the ones it serves, readiness is its /ready, its CA is the cacerts Secret.
    let ctl = o
        .deployments
        .iter()
        .map(|(_, d)| d)
        .find(|d| d.metadata.name.as_deref() == Some("isthmus-controller"))
        .expect("the controller Deployment");
    let ctl_c = &pod_spec(ctl).containers[0];
    let served: BTreeSet<i32> = ["--xds", "--secure", "--monitoring"]
        .iter()
        .map(|f| port_of(arg_after(ctl_c, f).unwrap_or_else(|| panic!("controller without {f}"))))
        .collect();
    assert_eq!(ports(service("istio-system", "istiod")), served);
    assert_eq!(served, [15010, 15012, 15014].into());
    let ready = ctl_c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("controller readiness");
    assert_eq!(
        (ready.path.as_deref(), &ready.port),
        (Some("/ready"), &IntOrString::Int(15014))
    );
    assert_eq!(
        arg_after(ctl_c, "--remote-secrets-from"),
        Some(values["CLUSTER"].as_str())
    );
    let own = arg_after(ctl_c, "--kubeconfig").expect("the controller's own cluster");
    assert_eq!(
        own.split_once('=').map(|(c, _)| c),
        Some(values["CLUSTER"].as_str()),
        "--remote-secrets-from must name a --kubeconfig cluster"
    );
    let ca_dir = arg_after(ctl_c, "--ca-dir").unwrap();
    let ca_mount = ctl_c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == ca_dir)
        .expect("--ca-dir is a mount");
    let ca_secret = pod_spec(ctl)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == ca_mount.name)
        .and_then(|v| v.secret.as_ref()?.secret_name.clone());
    assert_eq!(ca_secret.as_deref(), Some("cacerts"), "Istio's plugged-in CA Secret");
    for f in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
        "bootstrap-key",
    ] {
        assert!(
            up.contains(&format!("--from-file={f}=")),
            "up.sh must put {f} into cacerts"
        );
    }

    let gw_d = o
        .deployments
        .iter()
        .map(|(_, d)| d)
        .find(|d| d.metadata.name.as_deref() == Some("istio-eastwestgateway"))
        .expect("the gateway Deployment");
    let gw_c = &pod_spec(gw_d).containers[0];
    let ready = gw_c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("gateway readiness");
    assert_eq!(
        (ready.path.as_deref(), &ready.port),
        (Some("/healthz/ready"), &IntOrString::Int(15021))
    );
    assert_eq!(port_of(arg_after(gw_c, "--listen").unwrap()), 15443);
    assert_eq!(arg_after(gw_c, "--xds"), Some("istiod.istio-system.svc:15010"));

    // reviews in every cluster, v2 in its own file (the last cluster only).
    assert_eq!(ports(service("default", "reviews")), [9080].into());
    let reviews: BTreeMap<String, String> = o
        .deployments
        .iter()
        .filter(|(_, d)| pod_labels(d).get("app").map(String::as_str) == Some("reviews"))
        .map(|(f, d)| (pod_labels(d)["version"].clone(), f.clone()))
        .collect();
    assert_eq!(
        reviews,
        [
            ("v1".to_owned(), "bookinfo.yaml".to_owned()),
            ("v2".to_owned(), "reviews-v2.yaml".to_owned())
        ]
        .into()
    );

    // The remote secret: istioctl's shape, and a kubeconfig the controller can use.
    let remote = o
        .secrets
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(&format!("istio-remote-secret-{}", values["REMOTE"])))
        .expect("the remote secret");
    assert_eq!(remote.metadata.namespace.as_deref(), Some("istio-system"));
    assert_eq!(
        remote
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("istio/multiCluster"))
            .map(String::as_str),
        Some("true")
    );
    assert_eq!(
        remote
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("networking.istio.io/cluster")),
        Some(&values["REMOTE"])
    );
    let data = remote.data.as_ref().expect("data");
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        [&values["REMOTE"]],
        "one key: the cluster ID"
    );
    let kubeconfig = String::from_utf8(data[&values["REMOTE"]].0.clone()).unwrap();
    let kc = kube::config::Kubeconfig::from_yaml(&kubeconfig).expect("the kubeconfig template parses");
    let cluster = kc.clusters[0].cluster.as_ref().unwrap();
    assert_eq!(cluster.server.as_deref(), Some(values["KUBE_SERVER"].as_str()));
    assert!(cluster.certificate_authority_data.is_some());
    let user = kc.auth_infos[0].auth_info.as_ref().unwrap();
    assert!(user.token.is_some(), "a service-account token");
    assert_eq!(kc.current_context.as_deref(), Some(values["KUBE_CLUSTER"].as_str()));
}

/// An IPv4 CIDR as its first and last address.
fn cidr(s: &str) -> (u32, u32) {
    let (ip, len) = s.split_once('/').unwrap_or_else(|| panic!("{s}: not a CIDR"));
    let ip: std::net::Ipv4Addr = ip.parse().unwrap_or_else(|_| panic!("{s}: not IPv4"));
    let len: u32 = len.parse().unwrap();
    assert!(len <= 32, "{s}");
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    let first = u32::from(ip);
    assert_eq!(first & mask, first, "{s}: host bits set");
    (first, first | !mask)
}

#[test]
fn kind_clusters_have_distinct_non_overlapping_subnets_and_localities() {
    let mut subnets: Vec<(String, (u32, u32))> = Vec::new();
    for k in 1..=3 {
        let file = kind_dir().join(format!("cluster{k}.yaml"));
        let docs = documents(&file, &read(&file)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(docs.len(), 1, "{}", file.display());
        let c = &docs[0].1;
        assert_eq!(c["kind"], "Cluster");
        assert_eq!(c["apiVersion"], "kind.x-k8s.io/v1alpha4");
        assert_eq!(c["name"], format!("isthmus{k}"), "up.sh names cluster k isthmusk");
        let net = &c["networking"];
        let pods = net["podSubnet"].as_str().expect("podSubnet");
        let svcs = net["serviceSubnet"].as_str().expect("serviceSubnet");
        assert_eq!(pods, format!("10.24{k}.0.0/16"), "the design's address plan");
        subnets.push((format!("cluster{k} pods {pods}"), cidr(pods)));
        subnets.push((format!("cluster{k} services {svcs}"), cidr(svcs)));
        let nodes = c["nodes"].as_array().expect("nodes");
        assert!(!nodes.is_empty());
        for n in nodes {
            for l in ["topology.kubernetes.io/region", "topology.kubernetes.io/zone"] {
                assert!(n["labels"][l].is_string(), "{}: node without {l}", file.display());
            }
        }
    }
    for (i, (a, ra)) in subnets.iter().enumerate() {
        for (b, rb) in &subnets[i + 1..] {
            assert!(ra.1 < rb.0 || rb.1 < ra.0, "{a} overlaps {b}");
        }
    }
}

#[test]
fn the_scripts_and_the_image_fit_the_manifests() {
    for s in ["up.sh", "down.sh"] {
        let out = Command::new("bash").arg("-n").arg(kind_dir().join(s)).output().unwrap();
        assert!(out.status.success(), "{s}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let up = read(&kind_dir().join("up.sh"));
    // up.sh applies every manifest and uses every kind config.
    for f in manifest_files() {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert!(up.contains(&name), "up.sh never applies {name}");
    }
    assert!(
        up.contains("$HERE/$c.yaml"),
        "up.sh creates cluster k from clusterk.yaml"
    );
    // The image builds and installs every binary the manifests run.
    let docker = read(&kind_dir().join("Dockerfile"));
    let o = load();
    let programs: BTreeSet<String> = o
        .deployments
        .iter()
        .flat_map(|(_, d)| {
            let pod = pod_spec(d);
            pod.init_containers
                .iter()
                .flatten()
                .chain(&pod.containers)
                .cloned()
                .collect::<Vec<_>>()
        })
        .filter(|c| c.image.as_deref() == Some("isthmus:dev"))
        .filter_map(|c| c.command?.first().cloned())
        .collect();
    assert_eq!(programs.len(), 3, "{programs:?}");
    for p in &programs {
        assert!(docker.contains(&format!("-p {p}")), "the Dockerfile does not build {p}");
        assert!(
            docker.contains(&format!("/src/target/release/{p}")),
            "the Dockerfile does not install {p}"
        );
    }
    assert!(docker.contains("/usr/local/bin/") && docker.contains("--locked"));
    // What up.sh reads from reviews' answers, reviews' environment provides.
    for d in o
        .deployments
        .iter()
        .map(|(_, d)| d)
        .filter(|d| pod_labels(d)["app"] == "reviews")
    {
        let env: BTreeSet<&str> = pod_spec(d)
            .containers
            .iter()
            .flat_map(|c| c.env.iter().flatten())
            .map(|e| e.name.as_str())
            .collect();
        for var in ["ISTHMUS_CLUSTER", "ISTHMUS_VERSION"] {
            assert!(up.contains(var) && env.contains(var), "{var}: {:?}", d.metadata.name);
        }
    }
}
