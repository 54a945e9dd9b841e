//! Who may do what (issue 10): tokens, roles on every route, revocation and expiry.

use std::time::Duration;

use serde_json::{Value, json};
use switchboard_api::table::ROUTES;
use switchboard_core::model::Role;

use crate::harness::*;

async fn token(api: &Api, name: &str, role: &str, expires_at: Option<String>) -> Value {
    let mut body = json!({"name": name, "role": role});
    if let Some(at) = expires_at {
        body["expires_at"] = json!(at);
    }
    let r = api.post("/api/v1/tokens", body).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    r.body
}

/// Every operation of the route table, as each kind of caller: no token, a wrong one,
/// an expired one, one revoked through another api process, and each role.
#[tokio::test]
async fn every_route_answers_each_caller_by_role() {
    let env = Env::new();
    let api = env.api(&[]);
    let other = env.api(&[]);
    let viewer = token(&api, "dashboards", "viewer", None).await;
    let operator = token(&api, "ci", "operator", None).await;
    let admin = token(&api, "lab-admin", "admin", None).await;
    let revoked = token(&api, "leaked", "admin", None).await;
    let soon = (chrono::Utc::now() + chrono::Duration::milliseconds(1500)).to_rfc3339();
    let expired = token(&api, "temporary", "admin", Some(soon)).await;
    for t in [&viewer, &operator, &admin] {
        let secret = t["token"].as_str().unwrap();
        assert!(secret.starts_with("sb_") && secret.len() == 67, "{secret}");
    }
    let r = other.delete(&format!("/api/v1/tokens/{}", revoked["id"].as_str().unwrap())).await;
    assert_eq!(r.status, 204, "revoked through the other api process");
    tokio::time::sleep(Duration::from_millis(1600)).await;

    let secret = |t: &Value| t["token"].as_str().unwrap().to_string();
    let refused = [
        ("no token", None),
        ("a wrong token", Some("sb_0000000000000000000000000000000000000000000000000000000000000000".to_string())),
        ("an expired token", Some(secret(&expired))),
        ("a revoked token", Some(secret(&revoked))),
    ];
    let roles = [(Role::Viewer, secret(&viewer)), (Role::Operator, secret(&operator)), (Role::Admin, secret(&admin))];
    let id = uuid::Uuid::new_v4().to_string();
    assert!(ROUTES.len() >= 40, "{} operations", ROUTES.len());
    for (method, path, needed) in ROUTES {
        let url = format!("/api/v1{}", path.replace("{id}", &id).replace("{capture_id}", &id));
        let method = method.to_uppercase();
        let body = (method != "GET" && method != "DELETE").then(|| json!({}));
        for (who, t) in &refused {
            let r = api.request(&method, &url, body.clone(), t.as_deref()).await;
            assert_eq!(r.status, 401, "{method} {url} with {who}: {:?}", r.body);
            assert!(r.headers["www-authenticate"].to_str().unwrap().starts_with("Bearer"), "{method} {url}");
        }
        for (role, t) in &roles {
            let r = api.request(&method, &url, body.clone(), Some(t)).await;
            if role < needed {
                assert_eq!(r.status, 403, "{method} {url} as {role}: {:?}", r.body);
                assert!(r.body["error"]["message"].as_str().unwrap().contains(&format!("the {needed} role")));
            } else {
                assert!(![401, 403].contains(&r.status), "{method} {url} as {role}: {} {:?}", r.status, r.body);
            }
        }
    }

    // The list never shows a secret; uses are recorded (in batches).
    let list = api.get("/api/v1/tokens").await;
    assert_eq!(list.status, 200);
    let items = list.body["items"].as_array().unwrap();
    assert!(items.iter().all(|t| t.get("token").is_none() && t.get("token_hash").is_none()), "{items:?}");
    assert!(items.iter().any(|t| t["name"] == "leaked" && t["revoked_at"].is_string()));
    let viewer_id = viewer["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(10), "last_used_at recorded", || async {
        let list = api.get("/api/v1/tokens").await;
        list.body["items"]
            .as_array()?
            .iter()
            .find(|t| t["id"] == viewer_id.as_str() && t["last_used_at"].is_string())
            .cloned()
    })
    .await;
    let pg = env.pg().await;
    let stored: Vec<String> = sqlx::query_scalar("SELECT token_hash FROM api_tokens").fetch_all(&pg).await.unwrap();
    assert!(stored.iter().all(|h| h.len() == 64 && !h.starts_with("sb_")), "only hashes are stored");

    // Bad token requests: precise 422s, nothing created.
    for (body, field) in [
        (json!({"role": "viewer"}), "name"),
        (json!({"name": "x", "role": "root"}), "role"),
        (json!({"name": "x", "role": "viewer", "expires_at": "2001-01-01T00:00:00Z"}), "expires_at"),
        (json!({"name": "x", "role": "viewer", "scope": "all"}), "scope"),
    ] {
        let r = api.post("/api/v1/tokens", body.clone()).await;
        assert_eq!(r.status, 422, "{body}: {:?}", r.body);
        assert!(r.body["error"]["details"]["fields"].get(field).is_some(), "{body}: {:?}", r.body);
    }
    assert_eq!(api.post("/api/v1/tokens", json!({"name": "ci", "role": "viewer"})).await.status, 409);
}
