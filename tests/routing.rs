//! One layer, several upstreams: tokens go only to the origin they belong
//! to, a request to an unknown origin carries no token, and a redirect to
//! another origin never carries the token.

mod common;

use common::{Issuer, Upstream, body_text, client, get};
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_auth_refresh::{AuthRefreshLayer, AuthRoutingLayer, Origin, TokenHandle, UpstreamKey};
use tower_http::follow_redirect::FollowRedirectLayer;

fn origin(upstream: &Upstream) -> Origin {
    Origin::parse(&upstream.url("/")).unwrap()
}

struct Setup {
    a: Upstream,
    b: Upstream,
    elsewhere: Upstream,
    issuer_a: Issuer,
    issuer_b: Issuer,
    layer: AuthRoutingLayer,
}

async fn setup() -> Setup {
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let elsewhere = Upstream::start().await;
    let issuer_a = Issuer::new(&a).prefix("a");
    let issuer_b = Issuer::new(&b).prefix("b");
    let layer = AuthRoutingLayer::new()
        .origin(
            origin(&a),
            AuthRefreshLayer::new(TokenHandle::new(issuer_a.source())),
        )
        .origin(
            origin(&b),
            AuthRefreshLayer::new(TokenHandle::new(issuer_b.source())),
        )
        .key(
            "b",
            AuthRefreshLayer::new(TokenHandle::new(issuer_b.source())),
        );
    Setup {
        a,
        b,
        elsewhere,
        issuer_a,
        issuer_b,
        layer,
    }
}

#[tokio::test]
async fn each_origin_gets_only_its_own_token() {
    let s = setup().await;
    let service = s.layer.layer(client());
    let mut tasks = Vec::new();
    for i in 0..60 {
        let service = service.clone();
        let url = match i % 3 {
            0 => s.a.url("/x"),
            1 => s.b.url("/x"),
            _ => s.elsewhere.url("/x"),
        };
        tasks.push(tokio::spawn(async move {
            service.oneshot(get(&url)).await.unwrap()
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }

    let a_tokens: Vec<_> = s.a.seen().into_iter().map(|s| s.authorization).collect();
    let b_tokens: Vec<_> = s.b.seen().into_iter().map(|s| s.authorization).collect();
    assert_eq!(a_tokens.len(), 20);
    assert_eq!(b_tokens.len(), 20);
    assert!(
        a_tokens.iter().all(|t| t.as_deref() == Some("Bearer a-1")),
        "{a_tokens:?}"
    );
    assert!(
        b_tokens.iter().all(|t| t.as_deref() == Some("Bearer b-1")),
        "{b_tokens:?}"
    );
    let elsewhere = s.elsewhere.seen();
    assert_eq!(elsewhere.len(), 20);
    assert!(
        elsewhere.iter().all(|seen| seen.authorization.is_none()),
        "an unknown origin must get no token"
    );
    assert_eq!((s.issuer_a.calls(), s.issuer_b.calls()), (1, 1));
}

#[tokio::test]
async fn an_upstream_key_picks_the_route_and_an_unknown_key_sends_no_token() {
    let s = setup().await;
    let service = s.layer.layer(client());

    let mut keyed = get(&s.elsewhere.url("/by-key"));
    keyed.extensions_mut().insert(UpstreamKey::new("b"));
    service.clone().oneshot(keyed).await.unwrap();

    let mut unknown = get(&s.a.url("/unknown-key"));
    unknown.extensions_mut().insert(UpstreamKey::new("nope"));
    let response = service.oneshot(unknown).await.unwrap();
    assert_eq!(response.status(), 401, "sent without a token");

    let seen = s.elsewhere.seen();
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer b-1"));
    assert_eq!(s.a.seen()[0].authorization, None);
    assert_eq!(s.issuer_a.calls(), 0);
}

#[tokio::test]
async fn a_cross_origin_redirect_never_carries_the_token() {
    let s = setup().await;
    let service = ServiceBuilder::new()
        .layer(FollowRedirectLayer::new())
        .layer(s.layer.clone())
        .service(client());
    let target = s.elsewhere.url("/landing");
    let response = service
        .oneshot(get(&s.a.url(&format!("/redirect?to={target}"))))
        .await
        .unwrap();
    assert_eq!(response.status(), 401, "the other origin saw no token");
    assert_eq!(s.a.seen()[0].authorization.as_deref(), Some("Bearer a-1"));
    let landing = s.elsewhere.seen();
    assert_eq!(landing.len(), 1);
    assert_eq!(landing[0].path, "/landing");
    assert_eq!(landing[0].authorization, None);
}

#[tokio::test]
async fn a_same_origin_redirect_keeps_the_token() {
    let s = setup().await;
    let service = ServiceBuilder::new()
        .layer(FollowRedirectLayer::new())
        .layer(s.layer.clone())
        .service(client());
    let target = s.b.url("/landing");
    let response = service
        .oneshot(get(&s.b.url(&format!("/redirect?to={target}"))))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(body_text(response).await, "ok b-1 ");
}

#[tokio::test]
async fn a_single_layer_bound_to_an_origin_does_not_follow_a_redirect_with_its_token() {
    let a = Upstream::start().await;
    let elsewhere = Upstream::start().await;
    let issuer = Issuer::new(&a);
    let service = ServiceBuilder::new()
        .layer(FollowRedirectLayer::new())
        .layer(AuthRefreshLayer::new(TokenHandle::new(issuer.source())).origin(origin(&a)))
        .service(client());
    let target = elsewhere.url("/landing");
    service
        .oneshot(get(&a.url(&format!("/redirect?to={target}"))))
        .await
        .unwrap();
    assert_eq!(a.seen()[0].authorization.as_deref(), Some("Bearer tok-1"));
    assert_eq!(elsewhere.seen()[0].authorization, None);
}

#[tokio::test]
async fn a_keyed_request_redirected_elsewhere_does_not_carry_the_keyed_token() {
    let s = setup().await;
    let service = ServiceBuilder::new()
        .layer(FollowRedirectLayer::new())
        .layer(s.layer.clone())
        .service(client());
    // Key "b" is bound to no origin; the first hop gets b's token wherever it
    // goes, the redirected hop is routed by its own origin.
    let target = s.elsewhere.url("/landing");
    let mut request = get(&s.a.url(&format!("/redirect?to={target}")));
    request.extensions_mut().insert(UpstreamKey::new("b"));
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 401, "the other origin saw no token");
    assert_eq!(s.a.seen()[0].authorization.as_deref(), Some("Bearer b-1"));
    let landing = s.elsewhere.seen();
    assert_eq!(landing.len(), 1);
    assert_eq!(landing[0].authorization, None);
}
