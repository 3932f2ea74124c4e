//! `/openapi.json`: every route, who may call it, what it takes and what it answers, and the
//! error contract. Built from the route table the router and the permission check are built
//! from, so the document cannot drift from what is served.

use serde_json::{Value, json};

use crate::ErrorCode;
use crate::route::{Access, Route};

/// The OpenAPI 3.1 document.
pub fn document(routes: &[Route]) -> Value {
    let mut paths = serde_json::Map::new();
    for route in routes {
        let params: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
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
            "operationId": format!("{} {}", route.verb.as_str().to_lowercase(), route.path),
            "parameters": params,
            "responses": responses,
        });
        match route.access {
            Access::Roles(roles, _) => {
                operation["security"] = json!([{"bearer": []}]);
                operation["x-flywheel-roles"] =
                    json!(roles.iter().map(|r| r.as_str()).collect::<Vec<_>>());
            }
            Access::Probe | Access::Public => operation["security"] = json!([]),
        }
        if !route.body.is_empty() {
            operation["requestBody"] = json!({
                "required": true,
                "description": route.body,
                "content": {"application/json": {"schema": {"type": "object"}}},
            });
        }
        paths
            .entry(route.path)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("object")
            .insert(route.verb.as_str().to_lowercase(), operation);
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
