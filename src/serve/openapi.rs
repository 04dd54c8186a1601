//! The OpenAPI 3.1 description of `medpipe serve`, and [`check`], a checker of a JSON value
//! against one of its schemas (the subset it uses: `type`, `required`, `properties`, `items`,
//! `enum`), so the tests hold every response to the published description.

use serde_json::{json, Value};

/// The API description served at `/openapi.json`.
pub fn document() -> Value {
    let error = json!({"$ref": "#/components/schemas/Error"});
    let errors = |codes: &[&str]| -> Value {
        let mut m = serde_json::Map::new();
        for c in codes {
            m.insert(
                (*c).to_string(),
                json!({"description": describe(c), "content": {"application/json": {"schema": error}}}),
            );
        }
        Value::Object(m)
    };
    let model_request = |with_prompt: bool| {
        let mut props = json!({
            "images": {"type": "array", "items": {"type": "string"}, "description": "PNG or JPEG documents, base64 or data: URLs"},
            "max_new_tokens": {"type": "integer", "description": "new tokens at most (default and limit: the server's --max-new-tokens)"}
        });
        if with_prompt {
            props["prompt"] =
                json!({"type": "string", "description": "the question about the images"});
        }
        json!({
            "required": true,
            "content": {
                "multipart/form-data": {"schema": {"type": "object", "properties": {
                    "image": {"type": "string", "format": "binary", "description": "a document image; repeat for several"},
                    "prompt": {"type": "string"},
                    "max_new_tokens": {"type": "integer"}
                }}},
                "application/json": {"schema": {"type": "object", "properties": props}}
            }
        })
    };
    let answer_responses = |op: &str| {
        let mut r = errors(&["400", "413", "415", "500", "503", "504"]);
        r["200"] = json!({"description": op, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Answer"}}}});
        r
    };
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "medpipe serve",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Extract medical terms, values and units from clinical document images with a Qwen2.5-VL model (optionally fine-tuned by medpipe). Concurrent requests are generated together in batches."
        },
        "paths": {
            "/v1/extract": {"post": {
                "summary": "Extract terms, values and units from document images",
                "description": "The prompt is the one the pipeline trains and evaluates with; the answer is parsed into items exactly as the evaluate stage parses it.",
                "requestBody": model_request(false),
                "responses": answer_responses("the extracted items, the raw answer and timings")
            }},
            "/v1/analyze": {"post": {
                "summary": "Answer a free prompt about document images",
                "requestBody": model_request(true),
                "responses": answer_responses("the answer (items parsed when it holds any) and timings")
            }},
            "/health": {"get": {"summary": "Model, device, memory, uptime and queue depth",
                "responses": {"200": {"description": "the server is up", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}}}}},
            "/v1/benchmark": {"get": {"summary": "The workspace's report and benchmark figures (needs --workspace)",
                "responses": {
                    "200": {"description": "figures from reports/FINAL_REPORT.json and reports/baseline.json", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Benchmark"}}}},
                    "404": {"description": "no workspace, or no report in it", "content": {"application/json": {"schema": error}}}
                }}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                "responses": {"200": {"description": "text exposition format 0.0.4", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This description",
                "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/": {"get": {"summary": "The demo page",
                "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}}
        },
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["status", "code", "message"],
                "properties": {"status": {"type": "integer"}, "code": {"type": "string"}, "message": {"type": "string"}}
            }}},
            "Item": {"type": "object", "required": ["term", "value", "unit"], "properties": {
                "term": {"type": "string"}, "value": {"type": "string"}, "unit": {"type": "string", "description": "empty when none"}
            }},
            "Answer": {"type": "object",
                "required": ["items", "parse_status", "raw_answer", "timings", "tokens", "batch_size", "variant"],
                "properties": {
                    "items": {"type": "array", "items": {"$ref": "#/components/schemas/Item"}},
                    "parse_status": {"type": "string", "enum": ["clean", "recovered", "unparseable"]},
                    "raw_answer": {"type": "string"},
                    "timings": {"type": "object", "required": ["preprocess_ms", "queue_ms", "prefill_ms", "decode_ms", "total_ms"], "properties": {
                        "preprocess_ms": {"type": "number"}, "queue_ms": {"type": "number"}, "prefill_ms": {"type": "number"},
                        "decode_ms": {"type": "number"}, "total_ms": {"type": "number"}
                    }},
                    "tokens": {"type": "object", "required": ["prompt", "new", "stopped_on_eos", "per_s"], "properties": {
                        "prompt": {"type": "integer"}, "new": {"type": "integer"}, "stopped_on_eos": {"type": "boolean"}, "per_s": {"type": "number"}
                    }},
                    "batch_size": {"type": "integer", "description": "requests generated together with this one"},
                    "variant": {"type": "string"}
                }},
            "Health": {"type": "object",
                "required": ["status", "model", "memory", "uptime_s", "queue_depth", "batches", "mean_batch_size", "limits"],
                "properties": {
                    "status": {"type": "string", "enum": ["ok"]},
                    "model": {"type": "object", "required": ["model", "variant", "chosen_because", "model_dir", "device", "dtype", "weights_bytes", "load_ms", "max_position_embeddings"], "properties": {
                        "model": {"type": "string"}, "variant": {"type": "string"}, "chosen_because": {"type": "string"},
                        "model_dir": {"type": "string"}, "device": {"type": "string"}, "dtype": {"type": "string"},
                        "weights_bytes": {"type": "integer"}, "load_ms": {"type": "number"}, "max_position_embeddings": {"type": "integer"}
                    }},
                    "memory": {"type": "object", "required": ["rss_bytes", "peak_rss_bytes", "weights_bytes"], "properties": {
                        "rss_bytes": {"type": "integer"}, "peak_rss_bytes": {"type": "integer"}, "weights_bytes": {"type": "integer"}
                    }},
                    "uptime_s": {"type": "number"},
                    "queue_depth": {"type": "integer"},
                    "batches": {"type": "integer"},
                    "mean_batch_size": {"type": "number"},
                    "limits": {"type": "object", "required": ["max_batch", "max_queue", "max_new_tokens", "max_images", "max_body_bytes"]}
                }},
            "Benchmark": {"type": "object", "required": ["workspace", "recommendation", "variants"], "properties": {
                "workspace": {"type": "string"},
                "recommendation": {"type": "object", "required": ["variant", "reasons"]},
                "variants": {"type": "array", "items": {"type": "object", "required": ["name"]}}
            }}
        }}
    })
}

fn describe(status: &str) -> &'static str {
    match status {
        "400" => "bad input: not an image, an image bomb, an unknown field, too many images, a prompt past the context",
        "413" => "the body is larger than the server's limit",
        "415" => "neither multipart/form-data nor application/json",
        "500" => "generation failed",
        "503" => "the queue is full (see Retry-After) or the server is stopping",
        "504" => "no answer within the server's timeout",
        _ => "error",
    }
}

/// Checks `value` against the component schema `name` of [`document`]; the errors name the
/// JSON path of each mismatch.
pub fn check(name: &str, value: &Value) -> Result<(), Vec<String>> {
    let doc = document();
    let schema = &doc["components"]["schemas"][name];
    if schema.is_null() {
        return Err(vec![format!("no schema `{name}`")]);
    }
    let mut errors = Vec::new();
    check_at(&doc, schema, value, "$", &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn check_at(doc: &Value, schema: &Value, v: &Value, path: &str, errors: &mut Vec<String>) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let target = r
            .strip_prefix("#/")
            .map(|p| p.split('/').fold(doc, |node, k| &node[k]))
            .unwrap_or(&Value::Null);
        return check_at(doc, target, v, path, errors);
    }
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_u64() || v.is_i64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            _ => true,
        };
        if !ok {
            errors.push(format!("{path}: expected {t}, got {v}"));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(v) {
            errors.push(format!("{path}: {v} is not one of {allowed:?}"));
        }
    }
    if let Some(req) = schema.get("required").and_then(Value::as_array) {
        for k in req.iter().filter_map(Value::as_str) {
            if v.get(k).is_none() {
                errors.push(format!("{path}: missing `{k}`"));
            }
        }
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, s) in props {
            if let Some(x) = v.get(k) {
                check_at(doc, s, x, &format!("{path}.{k}"), errors);
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            check_at(doc, items, x, &format!("{path}[{i}]"), errors);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checker_accepts_a_conforming_answer_and_names_each_mismatch() {
        let good = json!({
            "items": [{"term": "Hemoglobin", "value": "13.5", "unit": "g/dL"}],
            "parse_status": "clean", "raw_answer": "[]",
            "timings": {"preprocess_ms": 1.0, "queue_ms": 0.0, "prefill_ms": 2.0, "decode_ms": 3.0, "total_ms": 6.0},
            "tokens": {"prompt": 10, "new": 2, "stopped_on_eos": true, "per_s": 4.0},
            "batch_size": 1, "variant": "custom"
        });
        check("Answer", &good).unwrap();
        let mut bad = good.clone();
        bad["items"][0]["unit"] = Value::Null;
        bad["parse_status"] = json!("fine");
        bad.as_object_mut().unwrap().remove("timings");
        let errs = check("Answer", &bad).unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.contains("$.items[0].unit: expected string")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.contains("$.parse_status")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.contains("missing `timings`")),
            "{errs:?}"
        );
        assert!(check("Nope", &good).is_err());
    }

    #[test]
    fn every_path_has_responses_and_every_reference_resolves() {
        let doc = document();
        let text = doc.to_string();
        for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &r[..r.find('"').unwrap()];
            assert!(doc["components"]["schemas"].get(name).is_some(), "{name}");
        }
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (op, body) in ops.as_object().unwrap() {
                assert!(body["responses"]["200"].is_object(), "{op} {path}");
            }
        }
    }
}
