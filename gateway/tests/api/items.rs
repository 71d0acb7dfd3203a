//! Every row of the items API table, on the happy path.

use crate::helpers::{Backends, TestApp, assert_error, json_body};

#[tokio::test]
async fn create_answers_201_with_location_etag_and_the_item() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;

    let rsp = app.post_json("/items", r#"{"name":"  Blue hat "}"#).await;
    assert_eq!(rsp.status(), 201);
    let id = {
        let headers = rsp.headers();
        assert_eq!(headers["etag"], "\"1\"");
        headers["location"].to_str().unwrap().to_owned()
    };
    let body = json_body(rsp).await;
    let item = &body["item"];
    assert_eq!(item["name"], "Blue hat", "the name is stored trimmed");
    assert_eq!(item["version"], 1);
    assert_eq!(id, format!("/items/{}", item["id"]));
    for field in ["created_at", "updated_at"] {
        let text = item[field].as_str().unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(text).is_ok(),
            "{field} is RFC 3339: {text}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn get_answers_the_item_with_etag_and_304_when_it_matches() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    let item = app.create("lamp").await;
    let path = format!("/items/{}", item["id"]);

    let rsp = app.get(&path).await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.headers()["etag"], "\"1\"");
    let body = json_body(rsp).await;
    assert_eq!(body["item"], item);
    assert!(body["source"] == "cache" || body["source"] == "database");

    let rsp = app
        .client
        .get(app.url(&path))
        .header("if-none-match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 304);
    assert_eq!(rsp.headers()["etag"], "\"1\"");
    assert!(rsp.bytes().await.unwrap().is_empty());

    let rsp = app
        .client
        .get(app.url(&path))
        .header("if-none-match", "\"7\"")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200, "a different ETag gets the body");
    app.stop().await;
}

#[tokio::test]
async fn list_pages_through_items_in_id_order() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            app.create(&format!("item {n}")).await["id"]
                .as_i64()
                .unwrap(),
        );
    }

    let page = json_body(app.get("/items?limit=2").await).await;
    assert_eq!(page["source"], "database");
    assert_eq!(page["count"], 2);
    let got: Vec<i64> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_i64().unwrap())
        .collect();
    assert_eq!(got, ids[..2]);
    assert_eq!(page["next_after"], ids[1]);

    let page = json_body(app.get(&format!("/items?limit=2&after={}", ids[3])).await).await;
    assert_eq!(page["count"], 1);
    assert_eq!(page["items"][0]["id"], ids[4]);
    assert!(page["next_after"].is_null(), "the last page says so");

    let page = json_body(app.get("/items").await).await;
    assert_eq!(page["count"], 5, "default limit 50 covers all five");
    app.stop().await;
}

#[tokio::test]
async fn update_bumps_the_version_and_honours_if_match() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    let item = app.create("chair").await;
    let path = format!("/items/{}", item["id"]);
    let put = |if_match: Option<&'static str>, name: &'static str| {
        let mut req = app
            .client
            .put(app.url(&path))
            .header("content-type", "application/json");
        if let Some(tag) = if_match {
            req = req.header("if-match", tag);
        }
        req.body(format!(r#"{{"name":"{name}"}}"#)).send()
    };

    let rsp = put(Some("\"1\""), "stool").await.unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.headers()["etag"], "\"2\"");
    let body = json_body(rsp).await;
    assert_eq!(body["item"]["name"], "stool");
    assert_eq!(body["item"]["version"], 2);
    assert_eq!(body["item"]["created_at"], item["created_at"]);

    let rsp = put(Some("\"1\""), "bench").await.unwrap();
    assert_eq!(
        rsp.headers()["etag"],
        "\"2\"",
        "412 tells the current version"
    );
    assert_error(rsp, 412, "precondition_failed").await;

    let rsp = put(None, "sofa").await.unwrap();
    assert_eq!(
        json_body(rsp).await["item"]["version"],
        3,
        "no If-Match: unconditional"
    );

    let rsp = put(Some("*"), "bed").await.unwrap();
    assert_eq!(json_body(rsp).await["item"]["version"], 4);

    let rsp = app
        .client
        .put(app.url("/items/999999"))
        .header("content-type", "application/json")
        .body(r#"{"name":"ghost"}"#)
        .send()
        .await
        .unwrap();
    assert_error(rsp, 404, "not_found").await;
    app.stop().await;
}

#[tokio::test]
async fn delete_answers_204_then_the_item_is_gone() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    let item = app.create("vase").await;
    let path = format!("/items/{}", item["id"]);
    assert_eq!(app.get(&path).await.status(), 200);

    let rsp = app.client.delete(app.url(&path)).send().await.unwrap();
    assert_eq!(rsp.status(), 204);
    assert!(rsp.bytes().await.unwrap().is_empty());

    assert_error(app.get(&path).await, 404, "not_found").await;
    let rsp = app.client.delete(app.url(&path)).send().await.unwrap();
    assert_error(rsp, 404, "not_found").await;
    let page = json_body(app.get("/items").await).await;
    assert_eq!(page["count"], 0);
    app.stop().await;
}

#[tokio::test]
async fn responses_carry_a_request_id_and_keep_a_safe_incoming_one() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    let rsp = app
        .client
        .get(app.url("/items"))
        .header("x-request-id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.headers()["x-request-id"], "req-42");
    let rsp = app
        .client
        .get(app.url("/items"))
        .header("x-request-id", "bad id!")
        .send()
        .await
        .unwrap();
    assert_ne!(rsp.headers()["x-request-id"], "bad id!");
    app.stop().await;
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let rsp = h2.get(app.url("/items")).send().await.unwrap();
    assert_eq!(rsp.version(), reqwest::Version::HTTP_2);
    assert_eq!(rsp.status(), 200);
    app.stop().await;
}
