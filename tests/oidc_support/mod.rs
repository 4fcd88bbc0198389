//! The interop tests' authorization server: panva's `oidc-provider`
//! (pinned in `tests/oidc/package.json`), started with
//! `node tests/oidc/server.mjs` on 127.0.0.1, one per test.
//!
//! Needs Node.js and `npm ci` in `tests/oidc`; without them the tests fail
//! with a message saying so.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const REDIRECT_URI: &str = "http://127.0.0.1/callback";

/// The running provider; killed when dropped (and it exits by itself when
/// its stdin closes).
pub struct Provider {
    _child: Child,
    port: u16,
}

impl Provider {
    pub async fn start() -> Self {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/oidc");
        assert!(
            dir.join("node_modules/oidc-provider").is_dir(),
            "tests/oidc/node_modules is missing: run the tests with `cargo xtask test`, \
             which runs `npm ci` in tests/oidc (needs Node.js >= 20.19 and npm)"
        );
        let mut child = match Command::new("node")
            .arg(dir.join("server.mjs"))
            .arg("0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
        {
            Ok(child) => child,
            Err(err) => panic!(
                "cannot start `node` ({err}): install Node.js >= 20.19 (e.g. `apt-get install nodejs npm`), \
                 then run `npm ci` in tests/oidc"
            ),
        };
        // Pass the server's stderr on, without its start-up warnings about
        // the development-only adapter and keys.
        let mut errors = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = errors.next_line().await {
                if !line.starts_with("oidc-provider WARNING") {
                    eprintln!("oidc-provider: {line}");
                }
            }
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let port = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("read provider stdout") {
                if let Some(port) = line.strip_prefix("READY ") {
                    return port.trim().parse::<u16>().expect("port number");
                }
            }
            panic!("oidc-provider exited before it was ready (its stderr is above)");
        })
        .await
        .expect("oidc-provider did not print READY within 30 s");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            _child: child,
            port,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn token_url(&self) -> String {
        self.url("/token")
    }

    /// An authorization code for the fixed account, obtained by the
    /// server's `/dev/code` route, which drives `/auth` like a browser.
    pub async fn authorization_code(&self, client_id: &str) -> String {
        self.authorization_code_with(client_id, "").await
    }

    /// Same, with more authorization request parameters (`extra`, already
    /// form-encoded: `code_challenge=…&dpop_jkt=…`).
    pub async fn authorization_code_with(&self, client_id: &str, extra: &str) -> String {
        let uri = format!(
            "{}?client_id={client_id}&redirect_uri={}&{extra}",
            self.url("/dev/code"),
            url::form_urlencoded::byte_serialize(REDIRECT_URI.as_bytes()).collect::<String>()
        );
        let json = self.get_json(&uri).await;
        json["code"].as_str().unwrap().to_owned()
    }

    /// Moves the server's clock `seconds` ahead. Its DPoP nonces step every
    /// 60 s; a nonce handed out is accepted until the fourth step after, so
    /// 240 s always rotates it out. The server tolerates 900 s of skew in
    /// the JWTs it verifies (client assertions signed with the real clock).
    pub async fn advance_clock(&self, seconds: u64) {
        let uri = format!("{}?seconds={seconds}", self.url("/dev/clock"));
        self.get_json(&uri).await;
    }

    /// Makes the server forget one access token, as if it had expired; the
    /// refresh token of its grant still works.
    pub async fn drop_access_token(&self, token: &str) {
        let uri = format!(
            "{}?token={}",
            self.url("/dev/drop-access-token"),
            url::form_urlencoded::byte_serialize(token.as_bytes()).collect::<String>()
        );
        assert_eq!(self.get_json(&uri).await["dropped"], true);
    }

    async fn get_json(&self, uri: &str) -> serde_json::Value {
        let response = plain_client()
            .request(Request::get(uri).body(Full::default()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }

    /// RFC 7662 introspection, as the resource server.
    pub async fn introspect(&self, token: &str) -> serde_json::Value {
        introspect(&self.url("/token/introspection"), token).await
    }
}

pub fn plain_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn introspect(url: &str, token: &str) -> serde_json::Value {
    let form: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("token", token)
        .finish();
    let request = Request::post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header(
            "authorization",
            // resource-server:resource-server-secret
            "Basic cmVzb3VyY2Utc2VydmVyOnJlc291cmNlLXNlcnZlci1zZWNyZXQ=",
        )
        .body(Full::new(Bytes::from(form)))
        .unwrap();
    let response = plain_client().request(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}
