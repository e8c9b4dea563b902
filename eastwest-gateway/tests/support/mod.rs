//! Real parts for the gateway's end-to-end tests: a test CA with SPIFFE SVIDs
//! made at test time, a rustls backend that requires a client certificate and
//! tells the caller who it is, rustls clients, and the gateway binary itself.

#![allow(dead_code)] // each test file uses its own part of the support

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub const SERVICE: &str = "reviews.default.svc.cluster.local";
pub const SNI: &str = "outbound_.9080_._.reviews.default.svc.cluster.local";
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/productpage";
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/reviews";

/// Polls `cond` until it holds or `patience` passes.
pub async fn eventually<F, Fut>(patience: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + patience;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "not within {patience:?}: {what}");
    }
}

pub fn install_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A CA and SVIDs signed by it, in memory and as PEM files in a temp dir.
pub struct Pki {
    pub dir: tempdir::TempDir,
    pub ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf certificate and its key.
pub struct Svid {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        install_crypto();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "isthmus test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        let dir = tempdir::TempDir::new();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki {
            ca_der: ca.der().clone(),
            issuer: Issuer::new(params, key),
            dir,
        }
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// An SVID with `spiffe` as its only URI SAN (and `dns` names, for servers).
    pub fn svid(&self, name: &str, spiffe: &str, dns: &[&str]) -> Svid {
        let mut params = CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.subject_alt_names.push(SanType::URI(spiffe.try_into().unwrap()));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let cert_pem = self.dir.path().join(format!("{name}.pem"));
        let key_pem = self.dir.path().join(format!("{name}.key"));
        std::fs::write(&cert_pem, cert.pem()).unwrap();
        std::fs::write(&key_pem, key.serialize_pem()).unwrap();
        Svid {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            cert_pem,
            key_pem,
        }
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        Arc::new(roots)
    }

    /// A client that presents `svid` and checks the server's chain against the
    /// CA, by the service's name rather than the SNI, as mesh clients do.
    pub fn client(&self, svid: &Svid, alpn: &[&str]) -> TlsConnector {
        let inner = rustls::client::WebPkiServerVerifier::builder(self.roots())
            .build()
            .unwrap();
        let mut cfg = ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServiceNameVerifier(inner)))
            .with_client_auth_cert(svid.chain.clone(), svid.key.clone_key())
            .unwrap();
        cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        TlsConnector::from(Arc::new(cfg))
    }

    /// A server config that requires a client certificate from this CA.
    pub fn server(&self, svid: &Svid) -> TlsAcceptor {
        let verifier = WebPkiClientVerifier::builder(self.roots()).build().unwrap();
        let mut cfg = ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(svid.chain.clone(), svid.key.clone_key())
            .unwrap();
        cfg.alpn_protocols = vec![b"istio".to_vec(), b"istio-h2".to_vec(), b"http/1.1".to_vec()];
        TlsAcceptor::from(Arc::new(cfg))
    }
}

#[derive(Debug)]
struct ServiceNameVerifier(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ServiceNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _sni: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from(SERVICE).unwrap();
        self.0.verify_server_cert(end_entity, intermediates, &name, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The URI SAN of a DER certificate.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = x.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
        _ => None,
    })
}

/// A TLS backend that requires a client certificate. Per connection it sends
/// `hello <name> you-are <client SPIFFE ID> alpn <protocol>\n`, echoes every line back, and after
/// the client's close_notify sends `bye <bytes read>\n` and closes.
pub struct Backend {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(pki: &Pki, name: &str) -> Backend {
        let svid = pki.svid(&format!("backend-{name}"), SERVER_ID, &[SERVICE]);
        let acceptor = pki.server(&svid);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let name = name.to_owned();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let acceptor = acceptor.clone();
                let name = name.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let session = tls.get_ref().1;
                    let peer = session
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(spiffe_id_of);
                    let alpn = session.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned());
                    let (r, mut w) = tokio::io::split(tls);
                    let greeting = format!(
                        "hello {name} you-are {} alpn {}\n",
                        peer.as_deref().unwrap_or("nobody"),
                        alpn.as_deref().unwrap_or("none")
                    );
                    if w.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    let mut lines = tokio::io::BufReader::new(r);
                    let mut total = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match lines.read_line(&mut line).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                total += n;
                                if w.write_all(line.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = w.write_all(format!("bye {total}\n").as_bytes()).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Backend { addr, task }
    }

    /// Stops accepting; the port then refuses connections.
    pub fn stop(self) {
        self.task.abort();
    }
}

/// A client connection through the gateway, reading the backend's greeting.
pub struct Call {
    pub tls: tokio_rustls::client::TlsStream<TcpStream>,
    pub greeting: String,
}

impl Call {
    pub async fn open(gw: SocketAddr, connector: &TlsConnector, sni: &str) -> std::io::Result<Call> {
        let tcp = TcpStream::connect(gw).await?;
        let name = ServerName::try_from(sni.to_owned()).map_err(std::io::Error::other)?;
        let mut tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
            .await
            .map_err(|_| std::io::Error::other("handshake timed out"))??;
        let greeting = read_line(&mut tls).await?;
        Ok(Call { tls, greeting })
    }

    /// Sends a line and returns the echo.
    pub async fn echo(&mut self, line: &str) -> std::io::Result<String> {
        self.tls.write_all(format!("{line}\n").as_bytes()).await?;
        read_line(&mut self.tls).await
    }
}

pub async fn read_line<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> std::io::Result<String> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .map_err(|_| std::io::Error::other("read timed out"))??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
        out.push(b[0]);
    }
}

/// The common arrangement: a backend, a gateway with `--route SNI=backend` plus
/// `args`, and a client holding the productpage SVID that offers ALPN `istio`.
pub struct Setup {
    pub pki: Pki,
    pub backend: Backend,
    pub gw: GatewayProcess,
    pub client: TlsConnector,
}

impl Setup {
    pub async fn new(args: &[&str]) -> Setup {
        let pki = Pki::new();
        let backend = Backend::start(&pki, "b1").await;
        let route = format!("{SNI}={}", backend.addr);
        let all: Vec<&str> = ["--route", route.as_str()]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        let gw = GatewayProcess::start(pki.dir.path(), &all);
        let client = pki.client(&pki.svid("client", CLIENT_ID, &[]), &["istio"]);
        Setup {
            pki,
            backend,
            gw,
            client,
        }
    }

    /// Opens a call through the gateway with the route's SNI.
    pub async fn call(&self) -> std::io::Result<Call> {
        Call::open(self.gw.listen, &self.client, SNI).await
    }
}

/// The gateway binary, run for real; killed on drop.
pub struct GatewayProcess {
    pub child: Child,
    pub listen: SocketAddr,
    pub health: SocketAddr,
    pub metrics: SocketAddr,
    pub admin: SocketAddr,
    pub stderr: PathBuf,
}

impl GatewayProcess {
    /// Starts `eastwest-gateway` with every port on 127.0.0.1:0 plus `args`.
    pub fn start(dir: &Path, args: &[&str]) -> GatewayProcess {
        Self::try_start(dir, args).unwrap_or_else(|e| panic!("gateway did not start: {e}"))
    }

    pub fn try_start(dir: &Path, args: &[&str]) -> Result<GatewayProcess, String> {
        let stderr = dir.join(format!("gateway-{}.log", std::process::id() ^ rand_u32()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_eastwest-gateway"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--health",
                "127.0.0.1:0",
                "--metrics",
                "127.0.0.1:0",
            ])
            .args(["--admin", "127.0.0.1:0", "--workers", "2"])
            .args(args)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if !line.starts_with("ready ") {
            let _ = child.wait();
            return Err(std::fs::read_to_string(&stderr).unwrap_or_default());
        }
        let field = |k: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("no {k} in {line:?}"))
                .parse()
                .unwrap()
        };
        Ok(GatewayProcess {
            listen: field("listen"),
            health: field("health"),
            metrics: field("metrics"),
            admin: field("admin"),
            child,
            stderr,
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The sum of the samples of `metric` whose labels contain every `k="v"` in
    /// `labels`; None when no sample matches.
    pub async fn metric(&self, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let text = http_get(self.metrics, "/stats/prometheus").await.ok()?.1;
        let values: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
            .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// Waits until `metric` (summed over matching samples) equals `value`.
    pub async fn wait_metric(&self, metric: &str, labels: &[(&str, &str)], value: f64) {
        eventually(
            Duration::from_secs(5),
            &format!("{metric}{labels:?} == {value}"),
            || async { self.metric(metric, labels).await == Some(value) },
        )
        .await;
    }

    /// Waits until connections closed for `reason` were counted `n` times.
    pub async fn wait_rejected(&self, reason: &str, n: f64) {
        self.wait_metric("isthmus_gateway_rejected_connections_total", &[("reason", reason)], n)
            .await;
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(0);
    h.finish() as u32
}

/// A minimal HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .map_err(std::io::Error::other)??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A scratch directory removed on drop.
pub mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new() -> TempDir {
            let p = std::env::temp_dir().join(format!("isthmus-test-{}-{}", std::process::id(), super::rand_u32()));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
