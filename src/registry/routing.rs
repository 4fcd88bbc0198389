//! [`AuthRoutingLayer`]: one layer, several upstreams, each with its own
//! token; a request to any other origin goes out without a token.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Buf;
use http::{Request, Response};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use super::{Origin, Tenant, TokenRegistry};
use crate::body::{ReplayBody, ResponseBody};
use crate::future::ResponseFuture;
use crate::layer::LayerConfig;
use crate::service::{dispatch, passthrough};
use crate::{AuthRefreshLayer, BoxError, TokenHandle};

/// Picks a named upstream for a request, whatever its URL: put it in the
/// request's extensions. A name with no route sends the request without a
/// token.
///
/// ```
/// use tower_auth_refresh::UpstreamKey;
///
/// let request = http::Request::get("http://10.0.0.7/report")
///     .extension(UpstreamKey::new("billing"))
///     .body(())
///     .unwrap();
/// # let _ = request;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamKey(Arc<str>);

impl UpstreamKey {
    /// The upstream called `name`.
    pub fn new(name: impl AsRef<str>) -> Self {
        Self(Arc::from(name.as_ref()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Clone)]
struct Route {
    handle: TokenHandle,
    config: Arc<LayerConfig>,
}

impl From<AuthRefreshLayer> for Route {
    fn from(layer: AuthRefreshLayer) -> Self {
        Self {
            handle: layer.handle().clone(),
            config: layer.config().clone(),
        }
    }
}

#[derive(Clone, Default)]
struct Routes {
    by_origin: Vec<(Origin, Route)>,
    by_key: HashMap<Arc<str>, Route>,
    tenants: Option<(Origin, TokenRegistry)>,
}

impl Routes {
    /// The token and settings for `request`, or `None`: no token at all.
    fn resolve<B>(&self, request: &Request<B>) -> Option<Route> {
        let extensions = request.extensions();
        if let Some(key) = extensions.get::<UpstreamKey>() {
            let route = self.by_key.get(key.as_str())?;
            return route
                .config
                .sends_token_to(request.uri())
                .then(|| route.clone());
        }
        if let Some(tenant) = extensions.get::<Tenant>() {
            let (origin, registry) = self.tenants.as_ref()?;
            if !origin.matches(request.uri()) {
                return None;
            }
            let entry = registry.use_tenant(tenant.as_str());
            return Some(Route {
                handle: entry.handle.clone(),
                config: registry.inner().layer.clone(),
            });
        }
        self.by_origin
            .iter()
            .find(|(origin, _)| origin.matches(request.uri()))
            .map(|(_, route)| route.clone())
    }
}

/// A layer for a client that talks to several upstreams, each with its own
/// token, detector, injector and settings (an [`AuthRefreshLayer`] per
/// route). The route is chosen by an [`UpstreamKey`] or [`Tenant`] extension
/// on the request, else by the request's origin (scheme, host, port). A
/// request that matches no route is sent **without** any token: there is no
/// default token for an unknown host. Each hop of a redirect followed by an
/// outer `FollowRedirectLayer` is routed again, so a redirect to another
/// origin never carries the first origin's token.
///
/// ```
/// use tower_auth_refresh::{AuthRefreshLayer, AuthRoutingLayer, JsonBodyRule, Origin, Token, TokenHandle, token_source_fn};
///
/// fn handle(name: &'static str) -> TokenHandle {
///     TokenHandle::new(token_source_fn(move |_| async move {
///         Ok::<_, std::io::Error>(Token::bearer(format!("{name}-token")))
///     }))
/// }
///
/// let layer = AuthRoutingLayer::new()
///     .origin(Origin::parse("https://orders.example.com")?, AuthRefreshLayer::new(handle("orders")))
///     .origin(
///         Origin::parse("https://legacy.example.cn:8443")?,
///         AuthRefreshLayer::new(handle("legacy")).detector(JsonBodyRule::default_rules()),
///     )
///     .key("billing", AuthRefreshLayer::new(handle("billing")));
/// # let _ = layer;
/// # Ok::<(), tower_auth_refresh::InvalidOrigin>(())
/// ```
#[derive(Clone, Default)]
pub struct AuthRoutingLayer {
    routes: Arc<Routes>,
}

impl fmt::Debug for AuthRoutingLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthRoutingLayer")
            .field(
                "origins",
                &self
                    .routes
                    .by_origin
                    .iter()
                    .map(|(o, _)| o)
                    .collect::<Vec<_>>(),
            )
            .field("keys", &self.routes.by_key.keys().collect::<Vec<_>>())
            .field("tenants", &self.routes.tenants.as_ref().map(|(o, _)| o))
            .finish()
    }
}

impl AuthRoutingLayer {
    /// A layer with no routes: every request goes out without a token.
    pub fn new() -> Self {
        Self::default()
    }

    fn routes_mut(&mut self) -> &mut Routes {
        Arc::make_mut(&mut self.routes)
    }

    /// Requests to `origin` get the token and settings of `layer`. The first
    /// matching origin wins.
    pub fn origin(mut self, origin: Origin, layer: AuthRefreshLayer) -> Self {
        self.routes_mut().by_origin.push((origin, layer.into()));
        self
    }

    /// Requests carrying [`UpstreamKey`] `key` get the token and settings of
    /// `layer` (restricted to the layer's own
    /// [`origin`](AuthRefreshLayer::origin), if it has one).
    pub fn key(mut self, key: impl AsRef<str>, layer: AuthRefreshLayer) -> Self {
        self.routes_mut()
            .by_key
            .insert(Arc::from(key.as_ref()), layer.into());
        self
    }

    /// Requests to `origin` carrying a [`Tenant`] extension get that
    /// tenant's token from `registry`.
    pub fn tenants(mut self, origin: Origin, registry: TokenRegistry) -> Self {
        self.routes_mut().tenants = Some((origin, registry));
        self
    }
}

impl<S> Layer<S> for AuthRoutingLayer {
    type Service = AuthRouting<S>;

    fn layer(&self, inner: S) -> AuthRouting<S> {
        AuthRouting {
            inner,
            routes: self.routes.clone(),
        }
    }
}

/// The service of [`AuthRoutingLayer`].
#[derive(Clone)]
pub struct AuthRouting<S> {
    inner: S,
    routes: Arc<Routes>,
}

impl<S: fmt::Debug> fmt::Debug for AuthRouting<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthRouting")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> AuthRouting<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for AuthRouting<S>
where
    S: Service<Request<ReplayBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    ReqB: Body + Send + 'static,
    ReqB::Data: Buf + Send,
    ReqB::Error: Into<BoxError>,
    ResB: Body + Send + 'static,
    ResB::Data: Buf + Send,
    ResB::Error: Send + Sync + 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, ReqB, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        match self.routes.resolve(&request) {
            Some(route) => dispatch(inner, &route.handle, &route.config, request),
            None => passthrough(inner, request),
        }
    }
}
