//! Text templated with call variables: `"You are calling from {{caller}}."`.
//!
//! A template is parsed once, at load: `{{name}}` (spaces inside the braces allowed) is a
//! variable, everything else is literal text. A name is letters, digits and `_`; an unclosed
//! `{{` is an error. A variable that has no value when the template is rendered renders as the
//! empty string (webhooks may set any name, so names cannot all be known at load).
//!
//! A [`UrlTemplate`] is a template that is a URL (a flow's `http` step, a realtime HTTP
//! tool): parsed once at load into its parts, so each variable's place in the URL is known.
//! Values are data, never syntax: in a path segment or the query a value is percent-encoded
//! (every byte outside RFC 3986's unreserved set), a value that would make a whole path
//! segment `.` or `..` fails the render, and a variable in the scheme, the authority (user,
//! host, port) or the fragment is refused at load.

use std::fmt;

/// Why a template, or a URL template, cannot be parsed. The message names the template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// A `{{` with no `}}` after it.
    #[error("unclosed `{{{{` in {text:?}")]
    Unclosed {
        /// The template.
        text: String,
    },
    /// A variable whose name is not letters, digits and `_`.
    #[error("{{{{{name}}}}} in {text:?}: a variable name is letters, digits and _")]
    Name {
        /// The name as written (trimmed).
        name: String,
        /// The template.
        text: String,
    },
    /// A variable in a URL's scheme, authority or fragment.
    #[error(
        "{{{{{name}}}}} is in the URL's {place}: a call's values could choose where the \
         request goes; a variable may only be in the path or the query"
    )]
    Place {
        /// The variable.
        name: String,
        /// Where it is (`scheme`, `user, host or port`, `fragment (never sent)`).
        place: &'static str,
    },
    /// Not an `http` or `https` URL.
    #[error("{text:?} is not an http(s) URL")]
    NotHttp {
        /// The template.
        text: String,
    },
    /// The URL as written, each variable an ordinary value, cannot be rendered.
    #[error("{text:?}: {source}")]
    Render {
        /// The template.
        text: String,
        /// Why.
        source: UrlError,
    },
    /// The URL has no host.
    #[error("{text:?} has no host")]
    NoHost {
        /// The template.
        text: String,
    },
    /// The URL as written is not a valid URL.
    #[error("{text:?} is not a valid URL: {problem}")]
    Url {
        /// The template.
        text: String,
        /// What the URL parser said.
        problem: String,
    },
}

impl From<ParseError> for String {
    /// The message, for callers whose own errors are still text.
    fn from(e: ParseError) -> Self {
        e.to_string()
    }
}

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
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let Some(close) = after.find("}}") else {
                return Err(ParseError::Unclosed { text: text.into() });
            };
            let name = after[..close].trim();
            if !is_name(name) {
                return Err(ParseError::Name {
                    name: name.into(),
                    text: text.into(),
                });
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

/// A URL with `{{variable}}` parts, each in a known place (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlTemplate {
    /// `scheme://authority`: fixed text.
    origin: String,
    /// The path's segments (each after a `/`), empty when the URL has no path.
    path: Vec<Vec<Part>>,
    /// The query after `?` (`None`: no `?`).
    query: Option<Vec<Part>>,
    /// The fragment after `#` (fixed text; never sent in a request).
    fragment: Option<String>,
}

/// Why a URL template cannot be rendered for these values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    /// The values make a whole path segment `.` or `..`, which URL parsers resolve (even
    /// percent-encoded) to another path.
    #[error("{{{{{variable}}}}} makes the path segment {segment:?}, which would change the path")]
    DotSegment {
        /// A variable of that segment.
        variable: String,
        /// The segment as rendered.
        segment: String,
    },
}

impl UrlTemplate {
    /// Parses `text`, an `http` or `https` URL template; the error says what is wrong (a
    /// variable in the scheme, the authority or the fragment; not a URL).
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let template = Template::parse(text)?;
        // The template as a stream of characters and variables.
        let mut tokens: Vec<Token<'_>> = Vec::new();
        for part in &template.parts {
            match part {
                Part::Text(t) => tokens.extend(t.chars().map(Token::Char)),
                Part::Var(name) => tokens.push(Token::Var(name)),
            }
        }
        let place_err = |name: &str, place: &'static str| ParseError::Place {
            name: name.into(),
            place,
        };
        let not_http = || ParseError::NotHttp { text: text.into() };
        let mut i = 0;
        let mut origin = String::new();
        // The scheme, then `://`.
        while i < tokens.len() {
            match tokens[i] {
                Token::Var(name) => return Err(place_err(name, "scheme")),
                Token::Char(':') => break,
                Token::Char(c) => origin.push(c),
            }
            i += 1;
        }
        let scheme = origin.to_ascii_lowercase();
        if !matches!(scheme.as_str(), "http" | "https") {
            return Err(not_http());
        }
        for expected in [':', '/', '/'] {
            match tokens.get(i) {
                Some(Token::Char(c)) if *c == expected => origin.push(*c),
                Some(Token::Var(name)) => return Err(place_err(name, "scheme")),
                _ => return Err(not_http()),
            }
            i += 1;
        }
        // The authority: up to the path, the query or the fragment.
        while let Some(token) = tokens.get(i) {
            match *token {
                Token::Var(name) => return Err(place_err(name, "user, host or port")),
                Token::Char('/' | '?' | '#') => break,
                Token::Char(c) => origin.push(c),
            }
            i += 1;
        }
        let mut path = Vec::new();
        while let Some(Token::Char('/')) = tokens.get(i) {
            i += 1;
            let mut segment = Vec::new();
            while let Some(token) = tokens.get(i) {
                match *token {
                    Token::Char('/' | '?' | '#') => break,
                    token => push(&mut segment, token),
                }
                i += 1;
            }
            path.push(segment);
        }
        let mut query = None;
        if let Some(Token::Char('?')) = tokens.get(i) {
            i += 1;
            let mut parts = Vec::new();
            while let Some(token) = tokens.get(i) {
                match *token {
                    Token::Char('#') => break,
                    token => push(&mut parts, token),
                }
                i += 1;
            }
            query = Some(parts);
        }
        let mut fragment = None;
        if let Some(Token::Char('#')) = tokens.get(i) {
            i += 1;
            let mut text = String::new();
            for token in &tokens[i..] {
                match *token {
                    Token::Var(name) => return Err(place_err(name, "fragment (never sent)")),
                    Token::Char(c) => text.push(c),
                }
            }
            fragment = Some(text);
        }
        let url = Self {
            origin,
            path,
            query,
            fragment,
        };
        // The URL as written, each variable an ordinary value, must be a valid URL.
        let sample = url
            .render(|_| Some("x"))
            .map_err(|source| ParseError::Render {
                text: text.into(),
                source,
            })?;
        match reqwest::Url::parse(&sample) {
            Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => Ok(url),
            Ok(_) => Err(ParseError::NoHost { text: text.into() }),
            Err(e) => Err(ParseError::Url {
                text: text.into(),
                problem: e.to_string(),
            }),
        }
    }

    /// Whether the template has no variables.
    pub fn is_fixed(&self) -> bool {
        self.variables().next().is_none()
    }

    /// The variable names it uses.
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.path
            .iter()
            .flatten()
            .chain(self.query.iter().flatten())
            .filter_map(|p| match p {
                Part::Var(name) => Some(name.as_str()),
                Part::Text(_) => None,
            })
    }

    /// The scheme and the authority (`https://api.example.com:8443`), fixed at load.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The URL, each variable replaced by `lookup(name)` (empty when it has none),
    /// percent-encoded as data.
    pub fn render<'a>(&self, lookup: impl Fn(&str) -> Option<&'a str>) -> Result<String, UrlError> {
        let mut out = self.origin.clone();
        for segment in &self.path {
            out.push('/');
            let start = out.len();
            let mut variable = None;
            for part in segment {
                match part {
                    Part::Text(t) => out.push_str(t),
                    Part::Var(name) => {
                        encode(lookup(name).unwrap_or(""), &mut out);
                        variable.get_or_insert(name);
                    }
                }
            }
            let rendered = &out[start..];
            if let Some(variable) = variable
                && (rendered == "." || rendered == "..")
            {
                return Err(UrlError::DotSegment {
                    variable: variable.clone(),
                    segment: rendered.to_owned(),
                });
            }
        }
        if let Some(query) = &self.query {
            out.push('?');
            for part in query {
                match part {
                    Part::Text(t) => out.push_str(t),
                    Part::Var(name) => encode(lookup(name).unwrap_or(""), &mut out),
                }
            }
        }
        if let Some(fragment) = &self.fragment {
            out.push('#');
            out.push_str(fragment);
        }
        Ok(out)
    }
}

impl fmt::Display for UrlTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts = |f: &mut fmt::Formatter<'_>, parts: &[Part]| {
            for part in parts {
                match part {
                    Part::Text(t) => f.write_str(t)?,
                    Part::Var(name) => write!(f, "{{{{{name}}}}}")?,
                }
            }
            Ok(())
        };
        f.write_str(&self.origin)?;
        for segment in &self.path {
            f.write_str("/")?;
            parts(f, segment)?;
        }
        if let Some(query) = &self.query {
            f.write_str("?")?;
            parts(f, query)?;
        }
        if let Some(fragment) = &self.fragment {
            write!(f, "#{fragment}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Token<'a> {
    Char(char),
    Var(&'a str),
}

/// Appends a token to parts, joining characters into text.
fn push(parts: &mut Vec<Part>, token: Token<'_>) {
    match token {
        Token::Char(c) => match parts.last_mut() {
            Some(Part::Text(t)) => t.push(c),
            _ => parts.push(Part::Text(c.to_string())),
        },
        Token::Var(name) => parts.push(Part::Var(name.to_owned())),
    }
}

/// Appends `value` percent-encoded: every byte outside RFC 3986's unreserved set
/// (`A-Z a-z 0-9 - . _ ~`) as `%XX`.
pub fn encode(value: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in value.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

/// Whether `name` can name a variable or a step: letters, digits, `_` and `-` (steps) — for
/// variables `-` is not allowed.
pub fn is_name(name: &str) -> bool {
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
        assert_eq!(
            Template::parse("a {{caller"),
            Err(ParseError::Unclosed {
                text: "a {{caller".into()
            })
        );
        assert_eq!(
            Template::parse("a {{caller").unwrap_err().to_string(),
            "unclosed `{{` in \"a {{caller\""
        );
        assert_eq!(
            Template::parse("{{a b}}").unwrap_err().to_string(),
            "{{a b}} in \"{{a b}}\": a variable name is letters, digits and _"
        );
        assert!(Template::parse("{{}}").is_err());
    }

    fn render(t: &UrlTemplate, vars: &[(&str, &str)]) -> Result<String, UrlError> {
        t.render(|n| vars.iter().find(|(k, _)| *k == n).map(|(_, v)| *v))
    }

    #[test]
    fn url_values_are_data_in_the_path_and_the_query() {
        let t = UrlTemplate::parse("https://crm.example.com/customers/{{caller}}/lookup").unwrap();
        // The attack: the request stays on the intended path, the value intact.
        let url = render(&t, &[("caller", "0101234/../../../admin/delete?token=x#")]).unwrap();
        assert_eq!(
            url,
            "https://crm.example.com/customers/0101234%2F..%2F..%2F..%2Fadmin%2Fdelete%3Ftoken%3Dx%23/lookup"
        );
        let parsed = reqwest::Url::parse(&url).unwrap();
        assert_eq!(parsed.path_segments().unwrap().count(), 3);
        assert_eq!(parsed.query(), None);
        let t = UrlTemplate::parse("http://h/api?site={{siteId}}&x=1").unwrap();
        let url = render(&t, &[("siteId", "S1&admin=true")]).unwrap();
        assert_eq!(url, "http://h/api?site=S1%26admin%3Dtrue&x=1");
        let pairs: Vec<(String, String)> = reqwest::Url::parse(&url)
            .unwrap()
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("site".into(), "S1&admin=true".into()),
                ("x".into(), "1".into())
            ]
        );
        // Everything outside the unreserved set, UTF-8 included, is encoded.
        let mut out = String::new();
        encode("a b%+\\é~-._Z9", &mut out);
        assert_eq!(out, "a%20b%25%2B%5C%C3%A9~-._Z9");
        // Missing values are empty; fixed text is kept as written.
        assert_eq!(render(&t, &[]).unwrap(), "http://h/api?site=&x=1");
        assert_eq!(t.to_string(), "http://h/api?site={{siteId}}&x=1");
        assert_eq!(t.variables().collect::<Vec<_>>(), ["siteId"]);
        assert!(UrlTemplate::parse("http://h/a#top").unwrap().is_fixed());
    }

    #[test]
    fn a_value_that_is_a_whole_dot_segment_fails() {
        let t = UrlTemplate::parse("http://h/customers/{{caller}}/lookup").unwrap();
        for value in [".", ".."] {
            assert_eq!(
                render(&t, &[("caller", value)]),
                Err(UrlError::DotSegment {
                    variable: "caller".into(),
                    segment: value.into()
                })
            );
        }
        // Two variables making `..` together, too.
        let t = UrlTemplate::parse("http://h/{{a}}{{b}}/x").unwrap();
        assert!(render(&t, &[("a", "."), ("b", ".")]).is_err());
        // Dots within a longer segment are data, and `%2E` is encoded as `%252E`.
        assert_eq!(
            render(&t, &[("a", "..."), ("b", "")]).unwrap(),
            "http://h/.../x"
        );
        assert_eq!(
            render(&t, &[("a", "%2E"), ("b", "%2e")]).unwrap(),
            "http://h/%252E%252e/x"
        );
        // In the query, dots are plain data.
        let t = UrlTemplate::parse("http://h/x?v={{a}}").unwrap();
        assert_eq!(render(&t, &[("a", "..")]).unwrap(), "http://h/x?v=..");
    }

    #[test]
    fn a_variable_that_could_choose_the_destination_is_refused() {
        for (text, place) in [
            ("{{s}}://h/x", "scheme"),
            ("http{{s}}://h/x", "scheme"),
            ("http://{{host}}/x", "user, host or port"),
            ("http://api.{{host}}/x", "user, host or port"),
            ("http://h:{{port}}/x", "user, host or port"),
            ("http://{{user}}@h/x", "user, host or port"),
            ("http://h{{path}}", "user, host or port"),
            ("http://h/x#{{f}}", "fragment"),
        ] {
            let e = UrlTemplate::parse(text).unwrap_err();
            assert!(
                matches!(&e, ParseError::Place { place: p, .. } if p.starts_with(place)),
                "{text}: {e}"
            );
            assert!(e.to_string().contains(place), "{text}: {e}");
        }
        for text in ["ftp://h/x", "h/x", "http:/h", "http://", "http://h/{{x"] {
            assert!(UrlTemplate::parse(text).is_err(), "{text}");
        }
        assert!(UrlTemplate::parse("HTTPS://h:8443").is_ok());
    }
}
