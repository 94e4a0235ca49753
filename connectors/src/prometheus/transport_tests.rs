//! The sink as `CREATE SINK` builds it, on the wire: basic auth and extra headers over TLS with
//! a private CA and a client certificate, bearer tokens read from a file at every request, and
//! secrets kept out of `Debug` output and metrics.

use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig, crypto};
use weir_runtime::Metrics;
use weir_runtime::connector::{SinkFactory, SinkSpec};
use weir_sql::Options;

use super::PrometheusSinkFactory;
use super::proto::decode_body;

/// A private CA, a server certificate for localhost, and a client certificate, as PEM files.
struct Pki {
    dir: tempfile::TempDir,
    ca_der: CertificateDer<'static>,
    server_cert: CertificateDer<'static>,
    server_key: PrivatePkcs8KeyDer<'static>,
}

impl Pki {
    fn new() -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca =
            CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
        let server_key = KeyPair::generate().expect("key");
        let server_cert = CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .signed_by(&server_key, &ca)
            .expect("server cert");
        let client_key = KeyPair::generate().expect("key");
        let client_cert = CertificateParams::new(vec!["weir".to_string()])
            .expect("params")
            .signed_by(&client_key, &ca)
            .expect("client cert");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write");
        std::fs::write(dir.path().join("client.pem"), client_cert.pem()).expect("write");
        std::fs::write(dir.path().join("client.key"), client_key.serialize_pem()).expect("write");
        Self {
            dir,
            ca_der: ca.der().clone(),
            server_cert: server_cert.der().clone(),
            server_key: PrivatePkcs8KeyDer::from(server_key.serialize_der()),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

/// One request as the TLS receiver saw it.
#[derive(Debug, Clone)]
struct Seen {
    /// Header lines, names lower-cased: `name: value`.
    headers: Vec<String>,
    samples: usize,
    client_certificate: bool,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find_map(|h| h.strip_prefix(name)?.strip_prefix(": "))
    }
}

/// A minimal HTTPS receiver that requires a client certificate signed by the CA; answers 204
/// and closes each connection. Returns its write URL and what it saw.
async fn tls_receiver(pki: &Pki) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let provider = Arc::new(crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca_der.clone()).expect("root");
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .expect("verifier");
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![pki.server_cert.clone()],
            PrivateKeyDer::Pkcs8(pki.server_key.clone_key()),
        )
        .expect("server config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let log = log.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return; // e.g. no client certificate: the handshake fails
                };
                let client_certificate = tls.get_ref().1.peer_certificates().is_some();
                let Some((headers, body)) = read_request(&mut tls).await else {
                    return;
                };
                let samples = decode_body(&body)
                    .map(|r| r.timeseries.iter().map(|t| t.samples.len()).sum())
                    .unwrap_or(0);
                log.lock().unwrap_or_else(|e| e.into_inner()).push(Seen {
                    headers,
                    samples,
                    client_certificate,
                });
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (format!("https://localhost:{port}/api/v1/write"), seen)
}

/// Reads one HTTP/1.1 request with a Content-Length body: its header lines and body.
async fn read_request(stream: &mut (impl AsyncReadExt + Unpin)) -> Option<(Vec<String>, Vec<u8>)> {
    let mut data = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_string();
    let headers: Vec<String> = head
        .lines()
        .skip(1)
        .filter_map(|l| {
            let (name, value) = l.split_once(':')?;
            Some(format!("{}: {}", name.to_ascii_lowercase(), value.trim()))
        })
        .collect();
    let length: usize = headers
        .iter()
        .find_map(|h| h.strip_prefix("content-length: ")?.parse().ok())
        .unwrap_or(0);
    let mut body = data[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((headers, body))
}

fn schema() -> arrow::datatypes::SchemaRef {
    super::tests::schema()
}

fn factory(pairs: &[(&str, &str)]) -> Result<PrometheusSinkFactory, String> {
    let spec = SinkSpec {
        name: "prom".into(),
        schema: schema(),
        restoring: false,
    };
    let options =
        Options::try_from_pairs(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .map_err(|e| e.to_string())?;
    PrometheusSinkFactory::try_new(&spec, &options).map_err(|e| e.to_string())
}

/// Writes `series` rows through a sink from `factory`, checkpoints them (rows are sent when
/// their checkpoint commits) and finishes it.
async fn write_through(factory: &PrometheusSinkFactory, metrics: &Metrics, series: usize) {
    let mut sink = factory.create(metrics).expect("sink");
    sink.write(super::tests::rows(series, 1000))
        .await
        .expect("write");
    sink.pre_commit(weir_runtime::CheckpointBarrier::new(1))
        .await
        .expect("pre-commit");
    sink.commit(1).await.expect("commit");
    sink.finish().await.expect("finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_and_headers_over_tls_with_a_private_ca_and_a_client_certificate() {
    let pki = Pki::new();
    let (url, seen) = tls_receiver(&pki).await;
    let [ca, cert, key] = ["ca.pem", "client.pem", "client.key"].map(|f| pki.path(f));
    let factory = factory(&[
        ("connector", "prometheus_remote_write"),
        ("url", &url),
        ("tls.ca_file", &ca),
        ("tls.cert_file", &cert),
        ("tls.key_file", &key),
        ("basic_auth.username", "weir"),
        ("basic_auth.password", "hunter2"),
        ("headers.X-Scope-OrgID", "tenant-1"),
    ])
    .expect("factory");
    let metrics = Metrics::new();
    write_through(&factory, &metrics, 50).await;

    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(
        seen.iter().map(|s| s.samples).sum::<usize>(),
        50,
        "{seen:?}"
    );
    for request in &seen {
        assert!(request.client_certificate);
        // base64("weir:hunter2")
        assert_eq!(
            request.header("authorization"),
            Some("Basic d2VpcjpodW50ZXIy")
        );
        assert_eq!(request.header("x-scope-orgid"), Some("tenant-1"));
        assert!(
            request
                .header("user-agent")
                .is_some_and(|ua| ua.starts_with("weir/")),
            "{request:?}"
        );
    }
    let debug = format!("{factory:?}");
    assert!(
        !debug.contains("hunter2") && !debug.contains("tenant-1"),
        "{debug}"
    );
    let text = metrics.encode();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(
        text.contains("weir_remote_write_requests_total{sink=\"prom\",code=\"204\"}"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_server_or_a_missing_client_certificate_sends_nothing() {
    let pki = Pki::new();
    let (url, seen) = tls_receiver(&pki).await;
    let [ca, cert, key] = ["ca.pem", "client.pem", "client.key"].map(|f| pki.path(f));
    let cases: [&[(&str, &str)]; 2] = [
        // The server's CA is not trusted.
        &[("tls.cert_file", &cert), ("tls.key_file", &key)],
        // The server requires a client certificate.
        &[("tls.ca_file", &ca)],
    ];
    for extra in cases {
        let mut pairs = vec![
            ("connector", "prometheus_remote_write"),
            ("url", url.as_str()),
            ("max_retry_duration", "300ms"),
            ("min_backoff", "10ms"),
        ];
        pairs.extend_from_slice(extra);
        let factory = factory(&pairs).expect("factory");
        let metrics = Metrics::new();
        write_through(&factory, &metrics, 5).await;
        let text = metrics.encode();
        assert!(
            text.contains(
                "weir_remote_write_samples_dropped_total{sink=\"prom\",reason=\"retry_timeout\"} 5"
            ),
            "{extra:?}: {text}"
        );
        assert!(
            text.contains("weir_remote_write_requests_total{sink=\"prom\",code=\"error\"}"),
            "{text}"
        );
    }
    assert!(seen.lock().unwrap_or_else(|e| e.into_inner()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_file_is_read_at_every_request_so_rotation_needs_no_restart() {
    let receiver = super::tests::Receiver::default();
    let url = super::tests::serve(receiver.clone()).await.to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "first-token\n").expect("write");
    let token_path = token.display().to_string();
    let factory = factory(&[
        ("connector", "prometheus_remote_write"),
        ("url", &url),
        ("bearer_token_file", &token_path),
    ])
    .expect("factory");
    let metrics = Metrics::new();
    write_through(&factory, &metrics, 3).await;
    std::fs::write(&token, "second-token\n").expect("write");
    write_through(&factory, &metrics, 3).await;

    let script = receiver.script();
    let tokens: Vec<&str> = script
        .received
        .iter()
        .filter_map(|r| r.headers.get("authorization")?.to_str().ok())
        .collect();
    assert_eq!(tokens.first(), Some(&"Bearer first-token"));
    assert_eq!(tokens.last(), Some(&"Bearer second-token"));
    assert_eq!(tokens.len(), script.received.len());
    let debug = format!("{factory:?}");
    assert!(!debug.contains("first-token"), "{debug}");
}

#[test]
fn tls_options_are_checked_at_create() {
    let pki = Pki::new();
    let url = "https://localhost:1/api/v1/write";
    let base = [("connector", "prometheus_remote_write"), ("url", url)];
    let with = |extra: &[(&str, &str)]| {
        let mut pairs = base.to_vec();
        pairs.extend_from_slice(extra);
        factory(&pairs).expect_err("refused")
    };
    let cert = pki.path("client.pem");
    let err = with(&[("tls.cert_file", &cert)]);
    assert!(err.contains("go together"), "{err}");
    let err = with(&[("tls.ca_file", "/no/such/ca.pem")]);
    assert!(err.contains("/no/such/ca.pem"), "{err}");
    let key = pki.path("client.key");
    let err = with(&[("tls.ca_file", &key)]);
    assert!(err.contains("tls.ca_file"), "{err}");
}
