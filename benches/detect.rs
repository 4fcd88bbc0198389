//! Classifying a 200 JSON response: status only, a code rule, and a code
//! rule plus keywords, for a 100-byte and a 60 KiB body.
//!
//! Each iteration runs the detector as the layer does: `check_head`, then
//! `check_body` on the whole body when the head asks for it.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, StatusCode, Version};
use tower_auth_refresh::{ExpiryDetector, HeadVerdict, JsonBodyRule, ResponseHead, Unauthorized};

fn body(size: usize) -> Vec<u8> {
    let mut items = String::new();
    let mut i = 0;
    while items.len() + 80 < size {
        if !items.is_empty() {
            items.push(',');
        }
        items.push_str(&format!(
            r#"{{"id":{i},"name":"item number {i}","price":{}}}"#,
            i * 7
        ));
        i += 1;
    }
    let json = format!(r#"{{"code":0,"msg":"ok","data":[{items}]}}"#);
    json.into_bytes()
}

fn classify(detector: &dyn ExpiryDetector, head: &ResponseHead<'_>, body: &[u8]) -> bool {
    match detector.check_head(head) {
        HeadVerdict::Expired => true,
        HeadVerdict::NotExpired | HeadVerdict::Veto => false,
        HeadVerdict::NeedBody => detector.check_body(head, body),
    }
}

fn detect(c: &mut Criterion) {
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    let head = ResponseHead::new(StatusCode::OK, Version::HTTP_11, &headers);
    let detectors: [(&str, Box<dyn ExpiryDetector>); 3] = [
        ("status_only", Box::new(Unauthorized::new())),
        (
            "code_rule",
            Box::new(JsonBodyRule::new().code_at("/code", [401, 40001, 40002, 40003])),
        ),
        ("code_and_keywords", Box::new(JsonBodyRule::default_rules())),
    ];
    let mut group = c.benchmark_group("detect");
    for (label, size) in [("100B", 100), ("60KiB", 60 * 1024)] {
        let body = body(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        for (name, detector) in &detectors {
            assert!(!classify(detector.as_ref(), &head, &body));
            group.bench_with_input(BenchmarkId::new(*name, label), &body, |b, body| {
                b.iter(|| black_box(classify(detector.as_ref(), &head, black_box(body))))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, detect);
criterion_main!(benches);
