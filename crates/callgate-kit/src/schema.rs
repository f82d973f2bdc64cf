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

/// Arguments a schema refuses: the first wrong place (`$.order.qty`) and what is wrong there.
/// The message is `$.order.qty: must be at most 10`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct Invalid {
    /// Where, from `$` (the arguments): `.name` for a property, `[i]` for an item.
    pub path: String,
    /// What is wrong there.
    pub problem: Problem,
}

/// What is wrong at one place of the arguments.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    /// The schema there is `false`.
    #[error("not allowed")]
    NotAllowed,
    /// The value is not of the type (or types) given.
    #[error("must be of type {0}")]
    Type(Value),
    /// The value is none of `enum`'s.
    #[error("must be one of {0}")]
    Enum(Value),
    /// The value is not `const`'s.
    #[error("must be {0}")]
    Const(Value),
    /// The value matches none of `anyOf`'s schemas.
    #[error("matches none of anyOf")]
    AnyOf,
    /// Below `minimum`.
    #[error("must be at least {0}")]
    Minimum(f64),
    /// Above `maximum`.
    #[error("must be at most {0}")]
    Maximum(f64),
    /// At or below `exclusiveMinimum`.
    #[error("must be more than {0}")]
    ExclusiveMinimum(f64),
    /// At or above `exclusiveMaximum`.
    #[error("must be less than {0}")]
    ExclusiveMaximum(f64),
    /// Fewer characters than `minLength`.
    #[error("must be at least {0} characters")]
    MinLength(u64),
    /// More characters than `maxLength`.
    #[error("must be at most {0} characters")]
    MaxLength(u64),
    /// Fewer items than `minItems`.
    #[error("must have at least {0} items")]
    MinItems(u64),
    /// More items than `maxItems`.
    #[error("must have at most {0} items")]
    MaxItems(u64),
    /// A property `required` names is missing.
    #[error("missing required property {0:?}")]
    Required(String),
    /// A property the schema does not know, where `additionalProperties` is `false`.
    #[error("is not a known property")]
    Unknown,
}

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
    pub fn validate(&self, value: &Value) -> Result<(), Invalid> {
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

fn validate(schema: &Value, value: &Value, path: &mut String) -> Result<(), Invalid> {
    let fail = |path: &str, problem: Problem| {
        Err(Invalid {
            path: path.to_owned(),
            problem,
        })
    };
    let o: &Map<String, Value> = match schema {
        Value::Bool(true) => return Ok(()),
        Value::Bool(false) => return fail(path, Problem::NotAllowed),
        Value::Object(o) => o,
        _ => return Ok(()),
    };
    if let Some(t) = o.get("type") {
        let ok = match t {
            Value::String(t) => type_matches(t, value),
            Value::Array(ts) => ts
                .iter()
                .any(|t| t.as_str().is_some_and(|t| type_matches(t, value))),
            _ => true,
        };
        if !ok {
            return fail(path, Problem::Type(t.clone()));
        }
    }
    if let Some(Value::Array(options)) = o.get("enum")
        && !options.contains(value)
    {
        return fail(path, Problem::Enum(Value::Array(options.clone())));
    }
    if let Some(c) = o.get("const")
        && c != value
    {
        return fail(path, Problem::Const(c.clone()));
    }
    if let Some(Value::Array(options)) = o.get("anyOf")
        && !options
            .iter()
            .any(|s| validate(s, value, &mut path.clone()).is_ok())
    {
        return fail(path, Problem::AnyOf);
    }
    if let Some(n) = value.as_f64() {
        let bound = |k: &str| o.get(k).and_then(Value::as_f64);
        if let Some(m) = bound("minimum")
            && n < m
        {
            return fail(path, Problem::Minimum(m));
        }
        if let Some(m) = bound("maximum")
            && n > m
        {
            return fail(path, Problem::Maximum(m));
        }
        if let Some(m) = bound("exclusiveMinimum")
            && n <= m
        {
            return fail(path, Problem::ExclusiveMinimum(m));
        }
        if let Some(m) = bound("exclusiveMaximum")
            && n >= m
        {
            return fail(path, Problem::ExclusiveMaximum(m));
        }
    }
    let limit = |k: &str| o.get(k).and_then(Value::as_u64);
    if let Some(s) = value.as_str() {
        let n = s.chars().count() as u64;
        if let Some(m) = limit("minLength")
            && n < m
        {
            return fail(path, Problem::MinLength(m));
        }
        if let Some(m) = limit("maxLength")
            && n > m
        {
            return fail(path, Problem::MaxLength(m));
        }
    }
    if let Some(items) = value.as_array() {
        let n = items.len() as u64;
        if let Some(m) = limit("minItems")
            && n < m
        {
            return fail(path, Problem::MinItems(m));
        }
        if let Some(m) = limit("maxItems")
            && n > m
        {
            return fail(path, Problem::MaxItems(m));
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
                    return fail(path, Problem::Required(name.to_owned()));
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
                        return fail(path, Problem::Unknown);
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
        let e = |v: Value| s.validate(&v).unwrap_err().to_string();
        assert_eq!(
            s.validate(&json!({"order_id": "A123", "qty": 11})),
            Err(Invalid {
                path: "$.qty".into(),
                problem: Problem::Maximum(10.0),
            })
        );
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
