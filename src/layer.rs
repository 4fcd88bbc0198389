//! [`AuthRefreshLayer`] and its settings.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::detect::ExpiryDetector;
use crate::registry::Origin;
use crate::{AuthRefresh, TokenHandle, TokenSource, Unauthorized};

/// Default cap on the request body kept for a replay: 1 MiB.
pub const DEFAULT_MAX_REPLAY_BYTES: usize = 1024 * 1024;
/// Default cap on the response body a detector may look at: 64 KiB.
pub const DEFAULT_PEEK_LIMIT: usize = 64 * 1024;
/// Default time a response may wait for a detector that asked for its body: 5 ms.
pub const DEFAULT_PEEK_DEADLINE: Duration = Duration::from_millis(5);

/// The per-layer settings shared by every service and future.
#[derive(Clone)]
pub(crate) struct LayerConfig {
    pub(crate) detector: Arc<dyn ExpiryDetector>,
    pub(crate) peek_limit: usize,
    pub(crate) peek_deadline: Duration,
    pub(crate) max_replay_bytes: usize,
    pub(crate) origin: Option<Origin>,
    /// DPoP proofs on every attempt, and nonce challenges answered.
    #[cfg(feature = "dpop")]
    pub(crate) dpop: Option<crate::dpop::DpopKey>,
}

impl LayerConfig {
    /// Puts the token on one attempt of a request and, with DPoP, a fresh
    /// proof. Without DPoP this is the injector alone.
    pub(crate) fn authorize<B>(
        &self,
        injector: &crate::TokenInjector,
        header: &http::HeaderValue,
        request: &mut http::Request<B>,
    ) -> Result<(), crate::BoxError> {
        injector.apply(header, request);
        self.prove(request)
    }

    /// With DPoP, a fresh proof for a request that carries its token;
    /// without, nothing.
    pub(crate) fn prove<B>(&self, request: &mut http::Request<B>) -> Result<(), crate::BoxError> {
        #[cfg(feature = "dpop")]
        if let Some(key) = &self.dpop {
            crate::dpop::stamp(key, request)?;
        }
        #[cfg(not(feature = "dpop"))]
        let _ = request;
        Ok(())
    }

    /// Whether a request to `uri` gets the token: always, unless the layer
    /// is bound to one origin.
    pub(crate) fn sends_token_to(&self, uri: &http::Uri) -> bool {
        self.origin
            .as_ref()
            .is_none_or(|origin| origin.matches(uri))
    }
}

impl LayerConfig {
    #[cfg(feature = "dpop")]
    fn dpop_key(&self) -> Option<&crate::dpop::DpopKey> {
        self.dpop.as_ref()
    }

    #[cfg(not(feature = "dpop"))]
    fn dpop_key(&self) -> Option<()> {
        None
    }
}

impl fmt::Debug for LayerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerConfig")
            .field("peek_limit", &self.peek_limit)
            .field("peek_deadline", &self.peek_deadline)
            .field("max_replay_bytes", &self.max_replay_bytes)
            .field("origin", &self.origin)
            .field("dpop", &self.dpop_key())
            .finish_non_exhaustive()
    }
}

/// A [`Layer`](https://docs.rs/tower-layer/0.3/tower_layer/trait.Layer.html)
/// that keeps the wrapped HTTP service authenticated: it puts the current
/// token on each request, recognises an expired-token answer, refreshes the
/// token once for all waiting requests and replays the request.
///
/// Where each setting lives:
///
/// * on the layer: which answers mean "expired" ([`detector`](Self::detector),
///   combined with [`ExpiryDetectorExt::or`](crate::ExpiryDetectorExt::or)),
///   the body caps ([`max_replay_bytes`](Self::max_replay_bytes),
///   [`peek_limit`](Self::peek_limit)) and the [`origin`](Self::origin) the
///   token is sent to;
/// * on the [`TokenHandle`], because a reqwest client or another layer
///   sharing the token uses them too: where the token goes on the request
///   ([`TokenHandleBuilder::injector`](crate::TokenHandleBuilder::injector)
///   with a [`TokenInjector`](crate::TokenInjector), default
///   `Authorization: Bearer …`), when it is refreshed ahead of expiry, the
///   refresh timeout and back-off, and the store.
///
/// ```
/// use std::time::Duration;
/// use tower::ServiceBuilder;
/// use tower_auth_refresh::{token_source_fn, AuthRefreshLayer, JsonBodyRule, RefreshContext, Token, TokenHandle, ExpiryDetectorExt, Unauthorized};
///
/// let handle = TokenHandle::new(token_source_fn(|_cx: RefreshContext| async {
///     Ok::<_, std::io::Error>(Token::bearer("t").with_expires_in(Duration::from_secs(3600)))
/// }));
/// let layer = AuthRefreshLayer::new(handle.clone())
///     .detector(Unauthorized::new().or(JsonBodyRule::default_rules()))
///     .max_replay_bytes(256 * 1024);
/// let builder = ServiceBuilder::new().layer(layer);
/// # let _ = builder;
/// ```
#[derive(Clone)]
pub struct AuthRefreshLayer {
    handle: TokenHandle,
    config: Arc<LayerConfig>,
}

impl fmt::Debug for AuthRefreshLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthRefreshLayer")
            .field("handle", &self.handle)
            .field("config", &self.config)
            .finish()
    }
}

impl AuthRefreshLayer {
    /// A layer around the token behind `handle`, with the default detector
    /// ([`Unauthorized`]) and caps.
    pub fn new(handle: TokenHandle) -> Self {
        Self {
            handle,
            config: Arc::new(LayerConfig {
                detector: Arc::new(Unauthorized::new()),
                peek_limit: DEFAULT_PEEK_LIMIT,
                peek_deadline: DEFAULT_PEEK_DEADLINE,
                max_replay_bytes: DEFAULT_MAX_REPLAY_BYTES,
                origin: None,
                #[cfg(feature = "dpop")]
                dpop: None,
            }),
        }
    }

    /// A layer with a new [`TokenHandle`] around `source`, default settings.
    pub fn from_source(source: impl TokenSource) -> Self {
        Self::new(TokenHandle::new(source))
    }

    /// Decides which responses mean the token expired (default: [`Unauthorized`]).
    /// Detectors combine with [`ExpiryDetectorExt::or`](crate::ExpiryDetectorExt::or)
    /// (also in the [`prelude`](crate::prelude)).
    pub fn detector(mut self, detector: impl ExpiryDetector) -> Self {
        Arc::make_mut(&mut self.config).detector = Arc::new(detector);
        self
    }

    /// The most response-body bytes a detector may look at (default 64 KiB).
    /// A longer body is never counted as expired.
    pub fn peek_limit(mut self, limit: usize) -> Self {
        Arc::make_mut(&mut self.config).peek_limit = limit;
        self
    }

    /// How long a response may wait for a detector that asked for its body
    /// (default 5 ms).
    ///
    /// The response head is handed to the caller once the body has ended,
    /// its bytes so far form one complete JSON object or array (a JSON
    /// error whose chunked transfer ends later is judged at once), it has
    /// passed the [peek limit](Self::peek_limit), or this deadline has
    /// passed, whichever comes first. A body not complete by then is passed
    /// on undetected (with a `tracing` debug event), the bytes read so far
    /// first: a stream of JSON events is never held back for longer than
    /// this. The deadline applies to a body with a `Content-Length` too: a
    /// server that stalls in the middle of a short body does not hold the
    /// head. A body whose `Content-Length` is over the peek limit is not
    /// read at all.
    ///
    /// A small answer usually arrives with its head: a body that has
    /// already ended when the head comes is judged at once, in the same
    /// poll, with no timer set and nothing boxed. Only a body still on its
    /// way waits, for at most this deadline.
    ///
    /// The deadline needs tokio's timer. On a runtime built without it
    /// (`enable_io()` only), only a body with a `Content-Length` within the
    /// peek limit is read (with no deadline); any other body is passed on
    /// undetected.
    ///
    /// Whatever the deadline, these bodies are never read by a detector and
    /// count as not expired:
    ///
    /// - streams: a content type with a `stream=` parameter (Kubernetes'
    ///   `application/json;stream=watch`), `text/event-stream`,
    ///   `application/x-ndjson`, `application/ndjson`, `application/jsonl`,
    ///   `application/jsonlines`, `application/x-jsonlines`,
    ///   `application/x-json-stream`, `application/json-seq`,
    ///   `application/stream+json`;
    /// - compressed bodies: any `Content-Encoding` other than `identity`.
    ///   To have compressed JSON read, put the decompression layer *inside*
    ///   this one (between it and the client, e.g. tower-http's
    ///   `DecompressionLayer` after `AuthRefreshLayer` in a
    ///   `ServiceBuilder`), so that the detector sees decoded bytes.
    ///   reqwest decodes bodies itself when its `gzip`/`brotli`/… features
    ///   are on, before any middleware sees them.
    pub fn peek_deadline(mut self, deadline: Duration) -> Self {
        Arc::make_mut(&mut self.config).peek_deadline = deadline;
        self
    }

    /// The most request-body bytes kept for a replay (default 1 MiB); `0`
    /// turns replay off for non-empty bodies. A larger body is streamed once,
    /// and an expired answer to it is returned with a
    /// [`RetrySkipped`](crate::RetrySkipped) marker.
    pub fn max_replay_bytes(mut self, limit: usize) -> Self {
        Arc::make_mut(&mut self.config).max_replay_bytes = limit;
        self
    }

    /// Sends the token only to requests for `origin` (scheme, host and
    /// port); requests to any other origin pass through untouched, without a
    /// token. Use it when the client can reach other hosts, for example when
    /// it follows redirects.
    ///
    /// ```
    /// use tower_auth_refresh::{AuthRefreshLayer, Origin, Token, TokenHandle, token_source_fn};
    ///
    /// let handle = TokenHandle::new(token_source_fn(|_| async {
    ///     Ok::<_, std::io::Error>(Token::bearer("t"))
    /// }));
    /// let layer = AuthRefreshLayer::new(handle).origin(Origin::parse("https://api.example.com")?);
    /// # Ok::<(), tower_auth_refresh::InvalidOrigin>(())
    /// ```
    pub fn origin(mut self, origin: Origin) -> Self {
        Arc::make_mut(&mut self.config).origin = Some(origin);
        self
    }

    /// DPoP (RFC 9449, feature `dpop`) for tokens bound to `key`: each
    /// attempt of each request goes out as `Authorization: DPoP <token>` with
    /// a fresh `DPoP` proof (`htm`, `htu`, `iat`, `jti`, `ath`, and the
    /// origin's latest nonce). A `401` with `WWW-Authenticate: DPoP
    /// error="use_dpop_nonce"` and a `DPoP-Nonce` is answered once, through
    /// the same replay as a refresh retry, with a new proof carrying that
    /// nonce; it is not a refresh. Every `DPoP-Nonce` response header updates
    /// the origin's nonce. Use the key the token source binds its tokens to
    /// ([`OAuth2SourceBuilder::dpop`](crate::oauth2::OAuth2SourceBuilder::dpop)).
    /// The handle's injector must put the token in `Authorization` (the
    /// default, [`TokenInjector::bearer`](crate::TokenInjector::bearer)): a
    /// request whose token would go elsewhere fails with an error instead of
    /// going out with a proof that does not cover its token.
    #[cfg(feature = "dpop")]
    #[cfg_attr(docsrs, doc(cfg(feature = "dpop")))]
    pub fn dpop(mut self, key: crate::dpop::DpopKey) -> Self {
        Arc::make_mut(&mut self.config).dpop = Some(key);
        self
    }

    pub(crate) fn config(&self) -> &Arc<LayerConfig> {
        &self.config
    }

    /// The handle on this layer's token.
    pub fn handle(&self) -> &TokenHandle {
        &self.handle
    }
}

impl<S> Layer<S> for AuthRefreshLayer {
    type Service = AuthRefresh<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthRefresh::from_parts(inner, self.handle.clone(), self.config.clone())
    }
}
