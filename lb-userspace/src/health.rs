//! Health checks of backends: what a check is (`[vip.health]` in lb.toml), one probe, and the
//! rise/fall state machine that turns probe results into up/down transitions.
//!
//! The probes follow keepalived and HAProxy: a TCP connect; an HTTP(S) GET whose status must be
//! the expected one; a UDP datagram that must be answered (an ICMP port unreachable fails it).
//! HTTPS checks liveness, not identity: the certificate is not verified (HAProxy's
//! `check-ssl verify none`).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;

/// A VIP's health check of its backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: CheckKind,
    /// Port to check; None = the backend's own port.
    pub port: Option<u16>,
    pub interval: Duration,
    /// Per probe, at most `interval`.
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend back.
    pub rise: u32,
    /// Consecutive failures that take an up backend out.
    pub fall: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    Tcp,
    Http {
        tls: bool,
        path: String,
        host: Option<String>,
        expect_status: u16,
    },
    Udp {
        send: String,
        expect: Option<String>,
    },
}

impl HealthCheck {
    /// The name of the check (`check = …`).
    pub fn name(&self) -> &'static str {
        match &self.kind {
            CheckKind::Tcp => "tcp",
            CheckKind::Http { tls: false, .. } => "http",
            CheckKind::Http { tls: true, .. } => "https",
            CheckKind::Udp { .. } => "udp",
        }
    }

    /// The `[vip.health]` table, as `Config::parse` reads it.
    pub fn to_toml(&self) -> String {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        let mut out = format!("\n[vip.health]\ncheck = \"{}\"\n", self.name());
        if let Some(p) = self.port {
            let _ = writeln!(out, "port = {p}");
        }
        let _ = write!(
            out,
            "interval = \"{}\"\ntimeout = \"{}\"\nrise = {}\nfall = {}\n",
            d(self.interval),
            d(self.timeout),
            self.rise,
            self.fall
        );
        match &self.kind {
            CheckKind::Tcp => {}
            CheckKind::Http {
                path,
                host,
                expect_status,
                ..
            } => {
                let _ = writeln!(out, "path = {path:?}\nexpect_status = {expect_status}");
                if let Some(h) = host {
                    let _ = writeln!(out, "host = {h:?}");
                }
            }
            CheckKind::Udp { send, expect } => {
                let _ = writeln!(out, "send = {send:?}");
                if let Some(e) = expect {
                    let _ = writeln!(out, "expect = {e:?}");
                }
            }
        }
        out
    }

    /// Where the probe goes for `backend`.
    pub fn target(&self, backend: SocketAddr) -> SocketAddr {
        SocketAddr::new(backend.ip(), self.port.unwrap_or(backend.port()))
    }

    /// One probe of `backend`, bounded by the timeout. Err says why it failed.
    pub async fn probe(&self, backend: SocketAddr) -> Result<(), String> {
        let target = self.target(backend);
        match tokio::time::timeout(self.timeout, self.probe_inner(target)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(self.timeout)
            )),
        }
    }

    async fn probe_inner(&self, target: SocketAddr) -> Result<(), String> {
        match &self.kind {
            CheckKind::Tcp => TcpStream::connect(target)
                .await
                .map(drop)
                .map_err(|e| format!("connect: {e}")),
            CheckKind::Http {
                tls,
                path,
                host,
                expect_status,
            } => {
                let tcp = TcpStream::connect(target)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let status = if *tls {
                    let tls = tls_connect(tcp, target, host.as_deref()).await?;
                    let host = host.clone().unwrap_or_else(|| target.to_string());
                    http_status(tls, path, &host).await?
                } else {
                    let host = host.clone().unwrap_or_else(|| target.to_string());
                    http_status(tcp, path, &host).await?
                };
                if status == *expect_status {
                    Ok(())
                } else {
                    Err(format!("HTTP status {status}, expected {expect_status}"))
                }
            }
            CheckKind::Udp { send, expect } => {
                let local: SocketAddr = if target.is_ipv4() {
                    "0.0.0.0:0".parse().expect("literal")
                } else {
                    "[::]:0".parse().expect("literal")
                };
                let sock = UdpSocket::bind(local)
                    .await
                    .map_err(|e| format!("bind: {e}"))?;
                // Connected, so that an ICMP port unreachable comes back as an error.
                sock.connect(target)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                sock.send(send.as_bytes())
                    .await
                    .map_err(|e| format!("send: {e}"))?;
                let mut buf = [0u8; 1500];
                let n = sock.recv(&mut buf).await.map_err(|e| format!("{e}"))?;
                match expect {
                    Some(e) if !String::from_utf8_lossy(&buf[..n]).contains(e.as_str()) => {
                        Err(format!("the reply does not contain {e:?}"))
                    }
                    _ => Ok(()),
                }
            }
        }
    }
}

/// Sends a GET and returns the status code of the response.
async fn http_status<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    path: &str,
    host: &str,
) -> Result<u16, String> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lb-health-check\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    // The status line is all we need; read until its end (bounded).
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the response: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let line = line.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|c| c.parse::<u16>().ok()),
    ) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => Ok(code),
        _ => Err(format!("not an HTTP response: {line:?}")),
    }
}

/// A TLS client connection; the server name (SNI) is `host` when it is a DNS name, so that
/// servers that pick a certificate by name answer as they would to clients.
async fn tls_connect(
    tcp: TcpStream,
    target: SocketAddr,
    host: Option<&str>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let config = tls_config();
    let name = host
        .and_then(|h| rustls::pki_types::ServerName::try_from(h.to_string()).ok())
        .unwrap_or_else(|| rustls::pki_types::ServerName::IpAddress(target.ip().into()));
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

/// Accepts any certificate (the signatures of the handshake are still checked): a health
/// check asks "does the server answer", not "is it who it claims".
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A backend's health as the checks see it.
#[derive(Clone, Debug)]
pub struct Health {
    pub up: bool,
    /// Consecutive results against the current state (failures while up, successes while
    /// down).
    streak: u32,
    pub since: Instant,
    pub last_error: Option<String>,
    pub checks_ok: u64,
    pub checks_failed: u64,
}

impl Health {
    pub fn new(up: bool) -> Health {
        Health {
            up,
            streak: 0,
            since: Instant::now(),
            last_error: None,
            checks_ok: 0,
            checks_failed: 0,
        }
    }

    /// Records one probe result; returns the new state if it changes (after `fall` failures
    /// in a row while up, or `rise` successes in a row while down).
    pub fn record(&mut self, result: &Result<(), String>, rise: u32, fall: u32) -> Option<bool> {
        let ok = result.is_ok();
        if ok {
            self.checks_ok += 1;
        } else {
            self.checks_failed += 1;
        }
        if let Err(e) = result {
            self.last_error = Some(e.clone());
        }
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { fall } else { rise };
        if self.streak < needed {
            return None;
        }
        self.up = ok;
        self.streak = 0;
        self.since = Instant::now();
        Some(ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall() {
        let mut h = Health::new(true);
        let bad = Err("x".to_string());
        // fall = 3: two failures, a success, then three failures.
        assert_eq!(h.record(&bad, 2, 3), None);
        assert_eq!(h.record(&bad, 2, 3), None);
        assert_eq!(h.record(&Ok(()), 2, 3), None);
        assert_eq!(h.record(&bad, 2, 3), None);
        assert_eq!(h.record(&bad, 2, 3), None);
        assert_eq!(h.record(&bad, 2, 3), Some(false));
        assert!(!h.up);
        // rise = 2: a success, a failure, two successes.
        assert_eq!(h.record(&Ok(()), 2, 3), None);
        assert_eq!(h.record(&bad, 2, 3), None);
        assert_eq!(h.record(&Ok(()), 2, 3), None);
        assert_eq!(h.record(&Ok(()), 2, 3), Some(true));
        assert_eq!((h.checks_ok, h.checks_failed), (4, 6));
    }

    #[tokio::test]
    async fn probes_against_local_servers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let status = if req.starts_with("GET /ok ") {
                        200
                    } else {
                        503
                    };
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                        )
                        .await;
                });
            }
        });
        let check = |kind: CheckKind| HealthCheck {
            kind,
            port: None,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            rise: 1,
            fall: 1,
        };
        let http = |path: &str| {
            check(CheckKind::Http {
                tls: false,
                path: path.into(),
                host: None,
                expect_status: 200,
            })
        };
        assert_eq!(check(CheckKind::Tcp).probe(addr).await, Ok(()));
        assert_eq!(http("/ok").probe(addr).await, Ok(()));
        let e = http("/bad").probe(addr).await.unwrap_err();
        assert!(e.contains("status 503"), "{e}");
        // A closed port: refused.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(check(CheckKind::Tcp).probe(closed).await.is_err());
        // UDP: an echo server answers, a closed port is refused by ICMP.
        let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..n], from).await;
            }
        });
        let udp = |expect: Option<&str>| {
            check(CheckKind::Udp {
                send: "hello".into(),
                expect: expect.map(String::from),
            })
        };
        assert_eq!(udp(None).probe(echo_addr).await, Ok(()));
        assert_eq!(udp(Some("hell")).probe(echo_addr).await, Ok(()));
        assert!(udp(Some("bye")).probe(echo_addr).await.is_err());
        let closed_udp = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(udp(None).probe(closed_udp).await.is_err());
    }

    /// HTTPS against a server with a self-signed certificate (tests/data, made with
    /// `openssl req -x509 -newkey ec …`): the check passes on the status, whatever the
    /// certificate.
    #[tokio::test]
    async fn https_probe() {
        use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
        let cert =
            CertificateDer::from_pem_slice(include_bytes!("../tests/data/health-test-cert.pem"))
                .unwrap();
        let key =
            PrivateKeyDer::from_pem_slice(include_bytes!("../tests/data/health-test-key.pem"))
                .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(s).await else {
                        return;
                    };
                    let mut buf = [0u8; 1024];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let ok = String::from_utf8_lossy(&buf[..n]).starts_with("GET /ok ");
                    let status = if ok { "200 OK" } else { "404 Not Found" };
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                        )
                        .await;
                    let _ = s.shutdown().await;
                });
            }
        });
        let https = |path: &str, expect_status| HealthCheck {
            kind: CheckKind::Http {
                tls: true,
                path: path.into(),
                host: Some("example.test".into()),
                expect_status,
            },
            port: None,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            rise: 1,
            fall: 1,
        };
        assert_eq!(https("/ok", 200).probe(addr).await, Ok(()));
        assert_eq!(https("/missing", 404).probe(addr).await, Ok(()));
        let e = https("/missing", 200).probe(addr).await.unwrap_err();
        assert!(e.contains("status 404"), "{e}");
        // Plain HTTP against the TLS port fails.
        let mut plain = https("/ok", 200);
        plain.kind = CheckKind::Http {
            tls: false,
            path: "/ok".into(),
            host: None,
            expect_status: 200,
        };
        assert!(plain.probe(addr).await.is_err());
    }
}
