//! [`HyperClient`]: a hyper-util client wrapped in an [`AuthRefreshLayer`],
//! named without spelling out the [`ReplayBody`] it sends (feature
//! `hyper-client`, on with the default `oauth2`).

use bytes::{Buf, Bytes};
use http_body::Body;
use http_body_util::Full;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::client::legacy::{Builder, Client};
use hyper_util::rt::TokioExecutor;
use tower_layer::Layer;

use crate::{AuthRefresh, AuthRefreshLayer, BoxError, ReplayBody, ResponseBody};

/// A hyper-util [`Client`] kept authenticated by an [`AuthRefreshLayer`]:
/// it takes requests with bodies of type `B` (default `Full<Bytes>`), over
/// the connector `C` (default: plain HTTP). Built by
/// [`AuthRefreshLayer::hyper_client`] or [`AuthRefreshLayer::hyper_client_with`].
///
/// A client that sends bodies of several types (a `Full` GET and a streamed
/// upload) takes a boxed body: `HyperClient<BoxBody<Bytes, BoxError>>`, with
/// `Full::new(bytes).map_err(Into::into).boxed()` on each request.
///
/// Stored behind a trait object, e.g. with other layers in a
/// [`ServiceBuilder`](https://docs.rs/tower/0.5/tower/builder/struct.ServiceBuilder.html),
/// the client becomes a `BoxCloneService`:
///
/// ```
/// use std::time::Duration;
///
/// use bytes::Bytes;
/// use http::Request;
/// use http_body_util::Full;
/// use tower::util::BoxCloneService;
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_auth_refresh::{AuthRefreshLayer, BoxError, HyperResponse, Token, TokenHandle, token_source_fn};
///
/// /// What the rest of the program holds: no layer or body type in sight.
/// type ApiClient = BoxCloneService<Request<Full<Bytes>>, HyperResponse, BoxError>;
///
/// fn api_client(handle: TokenHandle) -> ApiClient {
///     ServiceBuilder::new()
///         .timeout(Duration::from_secs(10))
///         .service(AuthRefreshLayer::new(handle).hyper_client())
///         .boxed_clone()
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let handle = TokenHandle::new(token_source_fn(|_| async {
///     Ok::<_, std::io::Error>(Token::bearer("t"))
/// }));
/// let client = api_client(handle);
/// # let _ = client;
/// # }
/// ```
pub type HyperClient<B = Full<Bytes>, C = HttpConnector> = AuthRefresh<Client<C, ReplayBody<B>>>;

/// The response of a [`HyperClient`]: hyper's body, handed back byte for
/// byte.
pub type HyperResponse = http::Response<ResponseBody<hyper::body::Incoming>>;

impl AuthRefreshLayer {
    /// A hyper-util client over plain HTTP, wrapped in this layer; the body
    /// type of its requests is inferred, or given: `hyper_client::<Full<Bytes>>()`.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::ServiceExt;
    /// use tower_auth_refresh::{AuthRefreshLayer, BoxError, HyperClient, Token, TokenHandle, token_source_fn};
    ///
    /// async fn get(client: HyperClient, url: &str) -> Result<http::StatusCode, BoxError> {
    ///     let request = http::Request::get(url).body(Full::<Bytes>::default())?;
    ///     Ok(client.oneshot(request).await?.status())
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let handle = TokenHandle::new(token_source_fn(|_| async {
    ///     Ok::<_, std::io::Error>(Token::bearer("t"))
    /// }));
    /// let client: HyperClient = AuthRefreshLayer::new(handle).hyper_client();
    /// # let _ = get;
    /// # let _ = client;
    /// # }
    /// ```
    pub fn hyper_client<B>(&self) -> HyperClient<B>
    where
        B: Body + Send + 'static,
        B::Data: Buf + Send,
        B::Error: Into<BoxError>,
    {
        self.layer(Client::builder(TokioExecutor::new()).build_http())
    }

    /// A hyper-util client with the settings of `builder` over `connector`
    /// (for example an HTTPS connector), wrapped in this layer.
    pub fn hyper_client_with<B, C>(&self, builder: &Builder, connector: C) -> HyperClient<B, C>
    where
        C: Connect + Clone,
        B: Body + Send + 'static,
        B::Data: Buf + Send,
        B::Error: Into<BoxError>,
    {
        self.layer(builder.build(connector))
    }
}
