//! Text templated with call variables: `"You are calling from {{caller}}."`.
//!
//! A template is parsed once, at load: `{{name}}` (spaces inside the braces allowed) is a
//! variable, everything else is literal text. A name is letters, digits and `_`; an unclosed
//! `{{` is an error. A variable that has no value when the template is rendered renders as the
//! empty string (webhooks may set any name, so names cannot all be known at load).

use std::fmt;

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(String),
}

impl Template {
    /// Parses `text`; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let Some(close) = after.find("}}") else {
                return Err(format!("unclosed `{{{{` in {text:?}"));
            };
            let name = after[..close].trim();
            if !is_name(name) {
                return Err(format!(
                    "{{{{{name}}}}} in {text:?}: a variable name is letters, digits and _"
                ));
            }
            parts.push(Part::Var(name.to_owned()));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Self { parts })
    }

    /// Whether the template has no variables (its text is known at load).
    pub fn is_fixed(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// The variable names it uses.
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(name) => Some(name.as_str()),
            Part::Text(_) => None,
        })
    }

    /// The text, each variable replaced by `lookup(name)` (empty when it has none).
    pub fn render<'a>(&self, lookup: impl Fn(&str) -> Option<&'a str>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Var(name) => out.push_str(lookup(name).unwrap_or("")),
            }
        }
        out
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.parts {
            match part {
                Part::Text(t) => f.write_str(t)?,
                Part::Var(name) => write!(f, "{{{{{name}}}}}")?,
            }
        }
        Ok(())
    }
}

/// Whether `name` can name a variable or a step: letters, digits, `_` and `-` (steps) — for
/// variables `-` is not allowed.
pub(crate) fn is_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_replaced_and_missing_ones_are_empty() {
        let t = Template::parse("From {{ caller }} to {{callee}}{{nothing}}.").unwrap();
        assert!(!t.is_fixed());
        let text = t.render(|n| match n {
            "caller" => Some("010"),
            "callee" => Some("02"),
            _ => None,
        });
        assert_eq!(text, "From 010 to 02.");
        assert_eq!(
            t.variables().collect::<Vec<_>>(),
            ["caller", "callee", "nothing"]
        );
        assert!(Template::parse("plain").unwrap().is_fixed());
        assert_eq!(t.to_string(), "From {{caller}} to {{callee}}{{nothing}}.");
    }

    #[test]
    fn bad_templates_say_why() {
        assert!(
            Template::parse("a {{caller")
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(
            Template::parse("{{a b}}")
                .unwrap_err()
                .contains("variable name")
        );
        assert!(Template::parse("{{}}").is_err());
    }
}
