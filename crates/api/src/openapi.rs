//! The OpenAPI 3 document of this API, served at `/api/v1/openapi.json`, generated
//! from the code: each handler's `#[utoipa::path]` (its path, parameters, body and
//! answers), the types it reads and writes (`ToSchema`), and the route table, which
//! lists the handlers (`table::TableDoc`) and gives each operation its role. What every
//! authenticated operation shares (the bearer scheme, the role, the error answers) and
//! the links from each create to what can be done with its id are added here, once.

use std::sync::OnceLock;

use axum::{http::header, response::IntoResponse};
use serde_json::json;
use switchboard_core::{catalog, model::Role};
use utoipa::{
    Modify, OpenApi,
    openapi::{
        self, Content, RefOr, Required,
        link::LinkBuilder,
        path::Operation,
        response::{Response, ResponseBuilder},
        security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme},
    },
};

use crate::{
    error::ErrorBody,
    routes::{health, hosts, metrics},
    table::{ROUTES, TableDoc},
};

/// The operations outside the route table (no API token): `(method, path)`.
pub const OUTSIDE: &[(&str, &str)] = &[
    ("get", "/health"),
    ("get", "/health/full"),
    ("get", "/metrics"),
    ("get", "/api/v1/openapi.json"),
    ("post", "/api/v1/hosts/{id}/heartbeat"),
];

/// The document's frame: what is not in the table.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Switchboard",
        description = "Runs telco tests on device farms. Conventions (versions and deprecation, pagination, \
                       idempotency, errors, roles, rate limits) are in docs/api.md.",
        license(name = "Apache-2.0"),
    ),
    paths(health::live, health::full, metrics::prometheus, document, hosts::heartbeat),
    components(schemas(ErrorBody)),
    tags(
        (name = "devices", description = "The device registry"),
        (name = "hosts", description = "Remote host agents and their phones"),
        (name = "modules", description = "The module catalog, and single-module runs"),
        (name = "runs", description = "Runs: history, control, events and captures"),
        (name = "workflows", description = "Ordered modules on one device"),
        (name = "campaigns", description = "Batches over many devices"),
        (name = "schedules", description = "Cron schedules"),
        (name = "tokens", description = "API tokens and their roles"),
        (name = "events", description = "The event feed: every event once, in one order (docs/feed.md)"),
        (name = "dashboard", description = "Figures over the run history for ops dashboards (docs/dashboard.md)"),
        (name = "system", description = "The deployment at a glance"),
        (name = "operations", description = "Health, metrics and this document"),
    )
)]
struct Frame;

/// The whole document.
pub fn spec() -> openapi::OpenApi {
    let mut doc = Frame::openapi();
    doc.merge(TableDoc::openapi());
    Contract.modify(&mut doc);
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

/// `GET /api/v1/openapi.json`: this document (no token needed).
#[utoipa::path(get, path = "/api/v1/openapi.json", operation_id = "openapi", tag = "operations", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", body = serde_json::Value)))]
pub async fn document() -> impl IntoResponse {
    static DOC: OnceLock<String> = OnceLock::new();
    let body = DOC.get_or_init(|| spec().to_json().unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")));
    ([(header::CONTENT_TYPE, "application/json")], body.as_str())
}

/// What every table operation shares, added from the table itself.
struct Contract;

impl Modify for Contract {
    fn modify(&self, doc: &mut openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        for (name, what) in [
            ("bearer", "An API token (`sb_…`) or SWITCHBOARD_ADMIN_TOKEN"),
            ("host_secret", "A host agent's own secret, from its registration"),
            ("metrics_token", "SWITCHBOARD_METRICS_TOKEN, when set"),
        ] {
            let mut http = Http::new(HttpAuthScheme::Bearer);
            http.description = Some(what.to_string());
            components.add_security_scheme(name, SecurityScheme::Http(http));
        }
        for (method, path, role) in ROUTES {
            let full = format!("/api/v1{path}");
            if let Some(op) = operation(doc, method, &full) {
                secure(op, *role);
                errors(op, method, &full);
            }
        }
        links(doc);
        catalog_ids(doc);
    }
}

/// Where a module id goes, the document lists the catalog's ids.
fn catalog_ids(doc: &mut openapi::OpenApi) {
    let ids: Vec<serde_json::Value> = catalog::builtin().iter().map(|m| json!(m.id)).collect();
    let with_ids = || {
        let mut s = openapi::ObjectBuilder::new().schema_type(openapi::schema::Type::String).build();
        s.enum_values = Some(ids.clone());
        RefOr::T(openapi::Schema::Object(s))
    };
    if let Some(components) = doc.components.as_mut() {
        for name in ["StepBody", "ItemBody"] {
            if let Some(RefOr::T(openapi::Schema::Object(body))) = components.schemas.get_mut(name) {
                body.properties.insert("module".into(), with_ids());
            }
        }
    }
    for (method, path) in [("get", "/api/v1/modules/{id}"), ("post", "/api/v1/modules/{id}/runs")] {
        let Some(op) = operation(doc, method, path) else { continue };
        for p in op.parameters.iter_mut().flatten() {
            if let RefOr::T(p) = p
                && p.name == "id"
            {
                p.schema = Some(with_ids());
            }
        }
    }
}

/// The operation at `method path`, if the document has it.
pub fn operation<'a>(doc: &'a mut openapi::OpenApi, method: &str, path: &str) -> Option<&'a mut Operation> {
    let item = doc.paths.paths.get_mut(path)?;
    match method {
        "get" => item.get.as_mut(),
        "post" => item.post.as_mut(),
        "put" => item.put.as_mut(),
        "patch" => item.patch.as_mut(),
        "delete" => item.delete.as_mut(),
        _ => None,
    }
}

/// Every `(method, path)` the document lists, sorted.
pub fn operations(doc: &openapi::OpenApi) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (path, item) in &doc.paths.paths {
        for (method, op) in [
            ("get", &item.get),
            ("post", &item.post),
            ("put", &item.put),
            ("patch", &item.patch),
            ("delete", &item.delete),
            ("head", &item.head),
            ("options", &item.options),
            ("trace", &item.trace),
        ] {
            if op.is_some() {
                out.push((method.to_string(), path.clone()));
            }
        }
    }
    out.sort();
    out
}

fn secure(op: &mut Operation, role: Role) {
    op.security = Some(vec![SecurityRequirement::new("bearer", Vec::<String>::new())]);
    op.extensions.get_or_insert_with(Default::default).insert("x-required-role".into(), json!(role));
    let needs = format!("Needs the `{role}` role (or higher).");
    op.description = Some(match op.description.take() {
        Some(d) if !d.is_empty() => format!("{d}\n\n{needs}"),
        _ => needs,
    });
}

fn envelope(description: &str) -> RefOr<Response> {
    ResponseBuilder::new()
        .description(description)
        .content("application/json", Content::new(Some(RefOr::Ref(openapi::Ref::from_schema_name("ErrorBody")))))
        .build()
        .into()
}

/// The error answers an operation can give beside its own: every one can be refused
/// (401, 403, 429) or fail (500, 503); one with a path id can miss (404); one with a
/// body can have a bad one (400, 408, 413, 415); and every one validates its query or
/// body (422).
fn errors(op: &mut Operation, method: &str, path: &str) {
    let mut add = |status: &str, description: &str| {
        op.responses.responses.entry(status.to_string()).or_insert_with(|| envelope(description));
    };
    add("401", "No token, or one unknown, revoked or expired (WWW-Authenticate: Bearer)");
    add("403", "The token's role is not enough (details.required_role)");
    add("422", "A parameter or field is wrong (details.fields names each)");
    add("429", "Over a rate limit (Retry-After)");
    add("500", "A fault of ours (quote the request_id)");
    add("503", "Postgres or Redis unavailable, or the request took too long");
    if path.contains('{') {
        add("404", "No such resource");
    }
    if matches!(method, "post" | "put" | "patch") {
        add("400", "The body is not JSON, or not of the expected shape");
        add("408", "The body did not arrive within the body read timeout");
        add("413", "The body is larger than the limit");
        add("415", "The body is not application/json");
    }
    if let Some(RefOr::T(body)) = op.request_body.as_mut() {
        // A start or an action may come without a body (it reads as `{}`); a create needs one.
        let optional = path.ends_with("/runs") || path.ends_with("/retry");
        body.required = Some(if optional { Required::False } else { Required::True });
    }
}

/// Links from each create to the operations on what it created, so a client (and the
/// fuzzer's stateful phase) can follow an id from the answer that made it.
fn links(doc: &mut openapi::OpenApi) {
    let run_ops: &[&str] =
        &["getRun", "listRunEvents", "listRunCaptures", "cancelRun", "pauseRun", "resumeRun", "retryRun"];
    let table: &[(&str, &str, &str, &str, &[&str])] = &[
        (
            "post",
            "/api/v1/devices",
            "201",
            "/id",
            &["getDevice", "updateDevice", "deleteDevice", "listDeviceRuns", "resetDeviceBreaker"],
        ),
        ("post", "/api/v1/hosts/register", "201", "/id", &["getHost", "deleteHost"]),
        (
            "post",
            "/api/v1/workflows",
            "201",
            "/id",
            &["getWorkflow", "replaceWorkflow", "deleteWorkflow", "startWorkflowRun"],
        ),
        (
            "post",
            "/api/v1/campaigns",
            "201",
            "/id",
            &["getCampaign", "replaceCampaign", "deleteCampaign", "startCampaignRun"],
        ),
        (
            "post",
            "/api/v1/schedules",
            "201",
            "/id",
            &["getSchedule", "updateSchedule", "deleteSchedule", "previewSchedule", "triggerSchedule"],
        ),
        ("post", "/api/v1/tokens", "201", "/id", &["revokeToken"]),
        ("post", "/api/v1/modules/{id}/runs", "202", "/id", run_ops),
        ("post", "/api/v1/workflows/{id}/runs", "202", "/id", run_ops),
        ("post", "/api/v1/campaigns/{id}/runs", "202", "/id", run_ops),
        ("post", "/api/v1/runs/{id}/retry", "202", "/id", run_ops),
        ("post", "/api/v1/schedules/{id}/trigger", "202", "/id", run_ops),
    ];
    for (method, path, status, pointer, targets) in table {
        let Some(op) = operation(doc, method, path) else { continue };
        let Some(RefOr::T(response)) = op.responses.responses.get_mut(*status) else { continue };
        for target in *targets {
            let link = LinkBuilder::new()
                .operation_id(*target)
                .parameter("id", format!("$response.body#{pointer}"))
                .description(format!("The {target} of what this created"))
                .build();
            response.links.insert(target.to_string(), RefOr::T(link));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The drift test: the document lists exactly what the router serves.
    #[test]
    fn the_document_lists_every_operation_the_router_serves_and_no_other() {
        let doc = spec();
        let listed: BTreeSet<(String, String)> = operations(&doc).into_iter().collect();
        let served: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(m, p, _)| (m.to_string(), format!("/api/v1{p}")))
            .chain(OUTSIDE.iter().map(|(m, p)| (m.to_string(), p.to_string())))
            .collect();
        let missing: Vec<_> = served.difference(&listed).collect();
        let extra: Vec<_> = listed.difference(&served).collect();
        assert!(missing.is_empty(), "served but not in the document: {missing:?}");
        assert!(extra.is_empty(), "in the document but not served: {extra:?}");
    }

    #[test]
    fn every_table_operation_says_its_role_and_its_errors() {
        let mut doc = spec();
        for (method, path, role) in ROUTES {
            let op = operation(&mut doc, method, &format!("/api/v1{path}")).expect("listed");
            let ext = op.extensions.as_ref().expect("extensions");
            assert_eq!(ext.get("x-required-role"), Some(&json!(role)), "{method} {path}");
            assert!(op.security.is_some(), "{method} {path}");
            for status in ["401", "403", "429", "500"] {
                assert!(op.responses.responses.contains_key(status), "{method} {path} lacks {status}");
            }
            assert!(op.operation_id.is_some(), "{method} {path}");
        }
    }

    #[test]
    fn operation_ids_are_unique_and_links_point_at_real_ones() {
        let doc = spec();
        let value = serde_json::to_value(&doc).unwrap();
        let mut ids = BTreeSet::new();
        for item in value["paths"].as_object().unwrap().values() {
            for op in item.as_object().unwrap().values() {
                if let Some(id) = op["operationId"].as_str() {
                    assert!(ids.insert(id.to_string()), "duplicate operationId {id}");
                }
            }
        }
        let mut links = 0;
        for item in value["paths"].as_object().unwrap().values() {
            for op in item.as_object().unwrap().values() {
                for response in op["responses"].as_object().into_iter().flat_map(|r| r.values()) {
                    for link in response["links"].as_object().into_iter().flat_map(|l| l.values()) {
                        links += 1;
                        let target = link["operationId"].as_str().unwrap();
                        assert!(ids.contains(target), "a link to {target}, which does not exist");
                    }
                }
            }
        }
        assert!(links >= 30, "only {links} links");
    }
}
