//! `HyperClient`: the layered hyper-util client built without naming
//! `ReplayBody`, boxed as a `BoxCloneService`, and with a boxed body that
//! carries both a `Full` GET and a streamed upload; against a real upstream
//! on 127.0.0.1.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Issuer, Upstream, body_text};
use futures::stream;
use http::Request;
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::{AuthRefreshLayer, BoxError, HyperClient, HyperResponse, TokenHandle};

type ApiClient = BoxCloneService<Request<Full<Bytes>>, HyperResponse, BoxError>;

fn handle(issuer: &Issuer) -> TokenHandle {
    TokenHandle::builder(issuer.source())
        .min_token_age(Duration::ZERO)
        .build()
}

#[tokio::test]
async fn a_boxed_hyper_client_refreshes_and_replays() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream);
    let handle = handle(&issuer);
    let client: ApiClient = ServiceBuilder::new()
        .timeout(Duration::from_secs(30))
        .service(AuthRefreshLayer::new(handle.clone()).hyper_client())
        .boxed_clone();

    let get = |path: &str| {
        Request::get(upstream.url(path))
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let response = client.clone().oneshot(get("/a")).await.unwrap();
    assert_eq!(body_text(response).await, "ok tok-1 ");
    upstream.revoke_all();
    let response = client.oneshot(get("/b")).await.unwrap();
    assert_eq!(body_text(response).await, "ok tok-2 ");

    let stats = handle.stats();
    assert_eq!((stats.refreshes, stats.retries), (2, 1));
}

#[tokio::test]
async fn one_client_with_a_boxed_body_sends_full_and_streamed_bodies() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(&upstream);
    let client: HyperClient<BoxBody<Bytes, BoxError>> =
        AuthRefreshLayer::new(handle(&issuer)).hyper_client();

    let full = Full::new(Bytes::from_static(b"{}"))
        .map_err(BoxError::from)
        .boxed();
    let request = Request::post(upstream.url("/full")).body(full).unwrap();
    let response = client.clone().oneshot(request).await.unwrap();
    assert_eq!(body_text(response).await, "ok tok-1 {}");

    let chunks = ["stre", "amed"].map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from(c))));
    let streamed = StreamBody::new(stream::iter(chunks)).boxed();
    let request = Request::post(upstream.url("/stream"))
        .body(streamed)
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(body_text(response).await, "ok tok-1 streamed");
    assert_eq!(issuer.calls(), 1);
}
