//! `/openapi.json`: every route, who may call it, what it takes and what it answers, and the
//! error contract. Built from [`ROUTES`] and the auth table, and checked against the router by
//! the tests, so the document cannot drift from what is served.

use serde_json::{Value, json};

use crate::ErrorCode;

/// One documented operation.
pub struct Operation {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    /// The JSON request body, if any, in words.
    pub body: Option<&'static str>,
    /// The success status.
    pub status: u16,
}

const fn op(
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    body: Option<&'static str>,
    status: u16,
) -> Operation {
    Operation {
        method,
        path,
        summary,
        body,
        status,
    }
}

/// Every route the API serves.
pub const ROUTES: &[Operation] = &[
    op(
        "GET",
        "/healthz",
        "Liveness and readiness: the database answers.",
        None,
        200,
    ),
    op(
        "GET",
        "/metrics",
        "Prometheus metrics (`flywheel_*`).",
        None,
        200,
    ),
    op("GET", "/openapi.json", "This document.", None, 200),
    op(
        "POST",
        "/v1/domains",
        "Register a domain.",
        Some(
            "{name, task: classification|generation, base_model: sha256:…|path, labels, policy?, out_of_scope_label?}",
        ),
        201,
    ),
    op(
        "GET",
        "/v1/domains",
        "The domains the caller may see, with correction counts and production version.",
        None,
        200,
    ),
    op("GET", "/v1/domains/{domain}", "One domain.", None, 200),
    op(
        "POST",
        "/v1/domains/{domain}/corrections",
        "Send corrections: one object, a JSON array or {corrections: [...]}, or NDJSON (application/x-ndjson). 202 after a durable commit.",
        Some(
            "{client_id?, input, model_output?, expected, source?: human|teacher, teacher?, metadata?}",
        ),
        202,
    ),
    op(
        "GET",
        "/v1/domains/{domain}/jobs",
        "The domain's fine-tune jobs, newest first.",
        None,
        200,
    ),
    op(
        "POST",
        "/v1/domains/{domain}/jobs",
        "Start a run now on every correction so far.",
        None,
        201,
    ),
    op(
        "GET",
        "/v1/domains/{domain}/versions",
        "Every evaluated version with its metrics and gate decision.",
        None,
        200,
    ),
    op(
        "GET",
        "/v1/domains/{domain}/versions/{version}/report",
        "The promotion report (?format=md|html; JSON by default).",
        None,
        200,
    ),
    op(
        "POST",
        "/v1/domains/{domain}/versions/{version}/approve",
        "Approve a version awaiting approval; production moves to it.",
        Some("{reason, by? (without auth)}"),
        200,
    ),
    op(
        "POST",
        "/v1/domains/{domain}/versions/{version}/reject",
        "Reject a version awaiting approval.",
        Some("{reason, by? (without auth)}"),
        200,
    ),
    op(
        "POST",
        "/v1/domains/{domain}/rollback",
        "Point production back at a version that was live.",
        Some("{to, reason, by? (without auth)}"),
        200,
    ),
    op(
        "GET",
        "/v1/domains/{domain}/audit",
        "Every gate decision, approval, rejection, rollback and alias move.",
        None,
        200,
    ),
    op(
        "GET",
        "/v1/domains/{domain}/aliases/{alias}",
        "For serving fleets: version, file URLs and sha256, base model, escalation threshold.",
        None,
        200,
    ),
    op(
        "PUT",
        "/v1/domains/{domain}/aliases/{alias}",
        "Move a non-production alias (compare-and-swap with `expected`).",
        Some("{to, expected?: version|null, reason, by? (without auth)}"),
        200,
    ),
    op(
        "GET",
        "/v1/domains/{domain}/aliases/{alias}/history",
        "Every move of an alias.",
        None,
        200,
    ),
    op(
        "GET",
        "/v1/jobs",
        "Jobs across the caller's domains (?status=&limit=).",
        None,
        200,
    ),
    op("GET", "/v1/jobs/{id}", "One job.", None, 200),
    op(
        "GET",
        "/v1/jobs/{id}/events",
        "A job's progress events (?after=N).",
        None,
        200,
    ),
    op(
        "GET",
        "/v1/jobs/{id}/checkpoints",
        "The training checkpoints a job saved, newest first: step, loss, where it is staged.",
        None,
        200,
    ),
    op(
        "POST",
        "/v1/jobs/{id}/cancel",
        "Cancel a queued or training job.",
        None,
        200,
    ),
    op(
        "POST",
        "/v1/tokens",
        "Create an API token; its secret is in this response only.",
        Some("{name, role: admin|department|steward, domains?}"),
        201,
    ),
    op(
        "GET",
        "/v1/tokens",
        "API tokens, without secrets.",
        None,
        200,
    ),
    op("DELETE", "/v1/tokens/{id}", "Revoke a token.", None, 204),
];

/// The OpenAPI 3.1 document.
pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for route in ROUTES {
        let params: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let roles = crate::auth::roles_for(route.method, route.path);
        let mut responses = serde_json::Map::new();
        responses.insert(
            route.status.to_string(),
            json!({"description": "success", "content": {"application/json": {"schema": {}}}}),
        );
        responses.insert(
            "default".into(),
            json!({"description": "an error: see the `code` table", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
        );
        let mut operation = json!({
            "summary": route.summary,
            "operationId": format!("{} {}", route.method.to_lowercase(), route.path),
            "parameters": params,
            "responses": responses,
        });
        match roles {
            Some(roles) => {
                operation["security"] = json!([{"bearer": []}]);
                operation["x-flywheel-roles"] =
                    json!(roles.iter().map(|r| r.as_str()).collect::<Vec<_>>());
            }
            None => operation["security"] = json!([]),
        }
        if let Some(body) = route.body {
            operation["requestBody"] = json!({
                "required": true,
                "description": body,
                "content": {"application/json": {"schema": {"type": "object"}}},
            });
        }
        paths
            .entry(route.path)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("object")
            .insert(route.method.to_lowercase(), operation);
    }
    let codes: Vec<Value> = ErrorCode::ALL
        .iter()
        .map(|c| json!({"const": c.as_str(), "description": format!("HTTP {}", c.status().as_u16())}))
        .collect();
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "flywheel",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Corrections in, gated LoRA adapters out. Every error is {code, message}; clients match on `code`.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"oneOf": codes},
                        "message": {"type": "string"},
                    },
                },
            },
        },
    })
}
