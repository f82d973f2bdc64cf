//! The JSON Schema subset function tools use, checked at load and enforced on every call's
//! arguments before any request is made.
//!
//! Supported: `type` (one or a list: `object`, `array`, `string`, `number`, `integer`,
//! `boolean`, `null`), `properties`, `required`, `additionalProperties` (bool or schema),
//! `items`, `enum`, `const`, `anyOf`, `minimum`, `maximum`, `exclusiveMinimum`,
//! `exclusiveMaximum`, `minLength`, `maxLength`, `minItems`, `maxItems`, and the annotations
//! `description`, `title`, `default`, `examples`, `format`, `$comment` (not enforced, as JSON
//! Schema itself says of annotations). Any other keyword is refused at load, naming it: a
//! schema the validator cannot enforce would let wrong arguments through silently.
//!
//! Hand-written (about the size of this file) rather than the `jsonschema` crate: that crate
//! brings a regex engine, URL resolution and dozens of crates for keywords function schemas
//! do not use.

use serde_json::{Map, Value};

const ANNOTATIONS: [&str; 6] = [
    "description",
    "title",
    "default",
    "examples",
    "format",
    "$comment",
];
const TYPES: [&str; 7] = [
    "object", "array", "string", "number", "integer", "boolean", "null",
];

/// A checked schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Schema(Value);

/// Where a problem is (`.properties.n.type`) and what it is.
pub type SchemaError = (String, String);

impl Schema {
    /// Checks that `schema` uses only what the validator enforces.
    pub fn compile(schema: &Value) -> Result<Self, SchemaError> {
        check(schema, &mut String::new())?;
        Ok(Self(schema.clone()))
    }

    /// Whether the schema describes an object (what function parameters must be).
    pub fn is_object(&self) -> bool {
        match self.0.get("type") {
            Some(Value::String(t)) => t == "object",
            _ => false,
        }
    }

    /// Checks `value`; the error names the first wrong place (`$.order.qty: must be at most
    /// 10`).
    pub fn validate(&self, value: &Value) -> Result<(), String> {
        validate(&self.0, value, &mut "$".to_owned())
    }
}

fn check(schema: &Value, path: &mut String) -> Result<(), SchemaError> {
    let Value::Object(o) = schema else {
        if schema.is_boolean() {
            return Ok(());
        }
        return Err((path.clone(), "a schema must be an object".into()));
    };
    let err = |path: &str, key: &str, problem: &str| Err((format!("{path}.{key}"), problem.into()));
    for (key, v) in o {
        let len = path.len();
        match key.as_str() {
            "type" => {
                let ok = |t: &Value| t.as_str().is_some_and(|t| TYPES.contains(&t));
                let valid = match v {
                    Value::Array(a) => !a.is_empty() && a.iter().all(ok),
                    t => ok(t),
                };
                if !valid {
                    return err(
                        path,
                        key,
                        "must be object, array, string, number, integer, boolean or null (or \
                         a list of them)",
                    );
                }
            }
            "properties" => {
                let Value::Object(props) = v else {
                    return err(path, key, "must be an object of schemas");
                };
                for (name, sub) in props {
                    path.push_str(&format!(".properties.{name}"));
                    check(sub, path)?;
                    path.truncate(len);
                }
            }
            "required" => {
                if !v.as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
                    return err(path, key, "must be a list of property names");
                }
            }
            "additionalProperties" | "items" => {
                path.push_str(&format!(".{key}"));
                check(v, path)?;
                path.truncate(len);
            }
            "anyOf" => {
                let Some(all) = v.as_array().filter(|a| !a.is_empty()) else {
                    return err(path, key, "must be a non-empty list of schemas");
                };
                for (i, sub) in all.iter().enumerate() {
                    path.push_str(&format!(".anyOf[{i}]"));
                    check(sub, path)?;
                    path.truncate(len);
                }
            }
            "enum" => {
                if v.as_array().is_none_or(|a| a.is_empty()) {
                    return err(path, key, "must be a non-empty list");
                }
            }
            "const" => {}
            "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" => {
                if !v.is_number() {
                    return err(path, key, "must be a number");
                }
            }
            "minLength" | "maxLength" | "minItems" | "maxItems" => {
                if !v.is_u64() {
                    return err(path, key, "must be a whole number");
                }
            }
            k if ANNOTATIONS.contains(&k) => {}
            k => {
                return err(
                    path,
                    k,
                    "is not a keyword callgate enforces (see docs/realtime.md for the list)",
                );
            }
        }
    }
    Ok(())
}

fn type_matches(t: &str, value: &Value) -> bool {
    match t {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => {
            value.is_i64()
                || value.is_u64()
                || value
                    .as_f64()
                    .is_some_and(|f| f.fract() == 0.0 && f.is_finite())
        }
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => false,
    }
}

fn validate(schema: &Value, value: &Value, path: &mut String) -> Result<(), String> {
    let o: &Map<String, Value> = match schema {
        Value::Bool(true) => return Ok(()),
        Value::Bool(false) => return Err(format!("{path}: not allowed")),
        Value::Object(o) => o,
        _ => return Ok(()),
    };
    let fail = |path: &str, problem: String| Err(format!("{path}: {problem}"));
    if let Some(t) = o.get("type") {
        let ok = match t {
            Value::String(t) => type_matches(t, value),
            Value::Array(ts) => ts
                .iter()
                .any(|t| t.as_str().is_some_and(|t| type_matches(t, value))),
            _ => true,
        };
        if !ok {
            return fail(path, format!("must be of type {t}"));
        }
    }
    if let Some(Value::Array(options)) = o.get("enum")
        && !options.contains(value)
    {
        return fail(
            path,
            format!("must be one of {}", Value::Array(options.clone())),
        );
    }
    if let Some(c) = o.get("const")
        && c != value
    {
        return fail(path, format!("must be {c}"));
    }
    if let Some(Value::Array(options)) = o.get("anyOf")
        && !options
            .iter()
            .any(|s| validate(s, value, &mut path.clone()).is_ok())
    {
        return fail(path, "matches none of anyOf".into());
    }
    if let Some(n) = value.as_f64() {
        let bound = |k: &str| o.get(k).and_then(Value::as_f64);
        if let Some(m) = bound("minimum")
            && n < m
        {
            return fail(path, format!("must be at least {m}"));
        }
        if let Some(m) = bound("maximum")
            && n > m
        {
            return fail(path, format!("must be at most {m}"));
        }
        if let Some(m) = bound("exclusiveMinimum")
            && n <= m
        {
            return fail(path, format!("must be more than {m}"));
        }
        if let Some(m) = bound("exclusiveMaximum")
            && n >= m
        {
            return fail(path, format!("must be less than {m}"));
        }
    }
    let limit = |k: &str| o.get(k).and_then(Value::as_u64);
    if let Some(s) = value.as_str() {
        let n = s.chars().count() as u64;
        if let Some(m) = limit("minLength")
            && n < m
        {
            return fail(path, format!("must be at least {m} characters"));
        }
        if let Some(m) = limit("maxLength")
            && n > m
        {
            return fail(path, format!("must be at most {m} characters"));
        }
    }
    if let Some(items) = value.as_array() {
        let n = items.len() as u64;
        if let Some(m) = limit("minItems")
            && n < m
        {
            return fail(path, format!("must have at least {m} items"));
        }
        if let Some(m) = limit("maxItems")
            && n > m
        {
            return fail(path, format!("must have at most {m} items"));
        }
        if let Some(item_schema) = o.get("items") {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                validate(item_schema, item, path)?;
                path.truncate(len);
            }
        }
    }
    if let Some(fields) = value.as_object() {
        let props = o.get("properties").and_then(Value::as_object);
        if let Some(Value::Array(required)) = o.get("required") {
            for name in required.iter().filter_map(Value::as_str) {
                if !fields.contains_key(name) {
                    return fail(path, format!("missing required property {name:?}"));
                }
            }
        }
        for (name, v) in fields {
            let len = path.len();
            path.push('.');
            path.push_str(name);
            match props.and_then(|p| p.get(name)) {
                Some(s) => validate(s, v, path)?,
                None => match o.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        return fail(path, "is not a known property".into());
                    }
                    Some(s) => validate(s, v, path)?,
                    None => {}
                },
            }
            path.truncate(len);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn order() -> Schema {
        Schema::compile(&json!({
            "type": "object",
            "properties": {
                "order_id": {"type": "string", "minLength": 4, "description": "the id"},
                "qty": {"type": "integer", "minimum": 1, "maximum": 10},
                "kind": {"enum": ["pickup", "delivery"]},
                "notes": {"type": ["string", "null"]},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}
            },
            "required": ["order_id"],
            "additionalProperties": false
        }))
        .unwrap()
    }

    #[test]
    fn arguments_are_checked_and_the_error_names_the_place() {
        let s = order();
        assert!(s.is_object());
        s.validate(&json!({"order_id": "A123", "qty": 2, "kind": "pickup", "notes": null}))
            .unwrap();
        let e = |v: Value| s.validate(&v).unwrap_err();
        assert_eq!(e(json!({})), "$: missing required property \"order_id\"");
        assert_eq!(
            e(json!({"order_id": "A1"})),
            "$.order_id: must be at least 4 characters"
        );
        assert_eq!(
            e(json!({"order_id": "A123", "qty": 11})),
            "$.qty: must be at most 10"
        );
        assert_eq!(
            e(json!({"order_id": "A123", "qty": 1.5})),
            "$.qty: must be of type \"integer\""
        );
        assert!(
            e(json!({"order_id": "A123", "kind": "air"})).starts_with("$.kind: must be one of")
        );
        assert_eq!(
            e(json!({"order_id": "A123", "tags": ["a", 3]})),
            "$.tags[1]: must be of type \"string\""
        );
        assert_eq!(
            e(json!({"order_id": "A123", "extra": 1})),
            "$.extra: is not a known property"
        );
        assert_eq!(e(json!("A123")), "$: must be of type \"object\"");
    }

    #[test]
    fn unknown_keywords_are_refused_at_load_by_path() {
        let e = Schema::compile(&json!({"type": "object", "properties": {
            "phone": {"type": "string", "pattern": "^[0-9]+$"}}}))
        .unwrap_err();
        assert_eq!(e.0, ".properties.phone.pattern");
        let e = Schema::compile(&json!({"type": "objekt"})).unwrap_err();
        assert_eq!(e.0, ".type");
        assert!(Schema::compile(&json!({"anyOf": []})).is_err());
    }
}
