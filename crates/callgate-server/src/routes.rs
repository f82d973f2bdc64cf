//! Routes: which agent answers which call.
//!
//! A route table is an ordered list; the first route whose `match` fits the call wins, and a
//! route without `match` is the default (it must come last: routes after it could never
//! match). Each route's agent is built from its settings when the table is built, so a bad
//! setting is found at load and a call never meets one. The table in force can be replaced
//! at run time ([`RouteHandle::replace`], SIGHUP in the binary): calls already live keep the
//! route they got, new calls use the new table.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Arc, RwLock};

use callgate_agent::{AgentFactory, Catalog};
use callgate_proto::Protocol;
use callgate_proto::detect::Start;
use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

/// One `[[routes]]` entry as written in the configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// The route's name (required, unique): stored with every call it handles.
    pub name: String,
    /// The agent's name (a built-in one, or one an embedder registered).
    pub agent: String,
    /// What a call must look like to take this route; absent: every call (the default).
    #[serde(rename = "match", default)]
    pub matcher: Option<MatchSpec>,
    /// The agent's own settings, validated by the agent.
    #[serde(default)]
    pub settings: serde_json::Value,
}

/// A route's `[routes.match]` table: every key given must match; a list means any of.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// `callbridge`, `inbound` or `twilio`.
    #[serde(default)]
    pub protocol: Option<OneOrMany>,
    /// CallBridge `agentId`.
    #[serde(default)]
    pub agent_id: Option<OneOrMany>,
    /// CallBridge `agentType`.
    #[serde(default)]
    pub agent_type: Option<OneOrMany>,
    /// CallBridge `siteId`.
    #[serde(default)]
    pub site_id: Option<OneOrMany>,
    /// The called number (inbound `didNumber`, CallBridge `callee`); a trailing `*` matches
    /// any number with that prefix.
    #[serde(default)]
    pub callee: Option<OneOrMany>,
    /// The calling number (inbound `callerId`, CallBridge `caller`); trailing `*` as above.
    #[serde(default)]
    pub caller: Option<OneOrMany>,
    /// Twilio `customParameters` by name (`custom = { campaign = "spring*" }`); trailing `*`
    /// as above. Only Twilio calls carry them: other calls never match a route that has this.
    #[serde(default)]
    pub custom: Option<BTreeMap<String, OneOrMany>>,
}

/// A string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut all = Vec::new();
                while let Some(v) = seq.next_element::<String>()? {
                    all.push(v);
                }
                Ok(OneOrMany(all))
            }
        }
        d.deserialize_any(V)
    }
}

/// A route table that cannot work, naming the route and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route {route}: {field}: {problem}")]
pub struct RouteError {
    /// The route: its name in quotes, or `routes[i]` when it has none.
    pub route: String,
    /// The field (`match.callee`, `agent`, `settings.frequency_hz`).
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

impl RouteError {
    fn new(route: &str, field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            route: format!("{route:?}"),
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Parses the `index`th `[[routes]]` entry (as JSON, converted from the file), naming the
/// route and the field in the error.
pub fn parse_spec(value: serde_json::Value, index: usize) -> Result<RouteSpec, RouteError> {
    let label = value
        .get("name")
        .and_then(|n| n.as_str())
        .map_or_else(|| format!("routes[{index}]"), |n| format!("{n:?}"));
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        RouteError {
            route: label,
            field: if path == "." { "routes".into() } else { path },
            problem: e.into_inner().to_string(),
        }
    })
}

/// What a call offers to be matched on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallFacts<'a> {
    /// The phone protocol.
    pub protocol: Protocol,
    /// The calling number.
    pub caller: &'a str,
    /// The called number.
    pub callee: &'a str,
    /// CallBridge `agentId` (none for inbound calls).
    pub agent_id: Option<&'a str>,
    /// CallBridge `agentType`.
    pub agent_type: Option<&'a str>,
    /// CallBridge `siteId`.
    pub site_id: Option<&'a str>,
    /// Twilio `customParameters` (none for the other protocols).
    pub custom: Option<&'a BTreeMap<String, String>>,
}

impl<'a> CallFacts<'a> {
    /// The facts of a call from its start message.
    pub fn of(start: &'a Start) -> Self {
        match start {
            Start::CallBridge(s) => {
                let c = &s.call_config;
                Self {
                    protocol: Protocol::CallBridge,
                    caller: &c.caller,
                    callee: &c.callee,
                    agent_id: Some(&c.agent_id),
                    agent_type: Some(&c.agent_type),
                    site_id: Some(&c.site_id),
                    custom: None,
                }
            }
            Start::Inbound(call) => Self {
                protocol: Protocol::Inbound,
                caller: &call.caller_id,
                callee: &call.did_number,
                agent_id: None,
                agent_type: None,
                site_id: None,
                custom: None,
            },
            Start::Twilio(s) => Self {
                protocol: Protocol::Twilio,
                caller: s.caller(),
                callee: s.callee(),
                agent_id: None,
                agent_type: None,
                site_id: None,
                custom: Some(&s.info.custom_parameters),
            },
        }
    }
}

/// Why a `match` pattern is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PatternError {
    /// An empty pattern.
    #[error("an empty pattern matches nothing; leave the key out instead")]
    Empty,
    /// A `*` that is not the last character (the pattern as written).
    #[error("{0:?}: `*` is allowed only at the end (a prefix match)")]
    StarInside(String),
}

/// An exact value, or a prefix (written with a trailing `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn parse(text: &str) -> Result<Self, PatternError> {
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        let (body, prefix) = match text.strip_suffix('*') {
            Some(body) => (body, true),
            None => (text, false),
        };
        if body.contains('*') {
            return Err(PatternError::StarInside(text.to_owned()));
        }
        Ok(if prefix {
            Self::Prefix(body.to_owned())
        } else {
            Self::Exact(body.to_owned())
        })
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(v) => value == v,
            Self::Prefix(p) => value.starts_with(p.as_str()),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(v) => f.write_str(v),
            Self::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// A compiled `match` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Matcher {
    protocol: Vec<Protocol>,
    agent_id: Vec<Pattern>,
    agent_type: Vec<Pattern>,
    site_id: Vec<Pattern>,
    callee: Vec<Pattern>,
    caller: Vec<Pattern>,
    /// Twilio custom parameters: each name's patterns must match.
    custom: Vec<(String, Vec<Pattern>)>,
}

impl Matcher {
    fn compile(route: &str, spec: &MatchSpec) -> Result<Self, RouteError> {
        let patterns = |field: &str, v: &Option<OneOrMany>| -> Result<Vec<Pattern>, RouteError> {
            let Some(OneOrMany(all)) = v else {
                return Ok(Vec::new());
            };
            if all.is_empty() {
                return Err(RouteError::new(
                    route,
                    format!("match.{field}"),
                    "an empty list matches nothing; leave the key out instead",
                ));
            }
            all.iter()
                .map(|p| Pattern::parse(p))
                .collect::<Result<_, _>>()
                .map_err(|problem| {
                    RouteError::new(route, format!("match.{field}"), problem.to_string())
                })
        };
        let protocol = match &spec.protocol {
            None => Vec::new(),
            Some(OneOrMany(all)) if all.is_empty() => {
                return Err(RouteError::new(
                    route,
                    "match.protocol",
                    "an empty list matches nothing",
                ));
            }
            Some(OneOrMany(all)) => all
                .iter()
                .map(|p| {
                    Protocol::from_name(p).ok_or_else(|| {
                        RouteError::new(
                            route,
                            "match.protocol",
                            format!("{p:?} is not a protocol (callbridge, inbound or twilio)"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let mut custom = Vec::new();
        if let Some(table) = &spec.custom {
            if table.is_empty() {
                return Err(RouteError::new(
                    route,
                    "match.custom",
                    "an empty table matches every call; leave the key out instead",
                ));
            }
            for (name, value) in table {
                if name.is_empty() {
                    return Err(RouteError::new(
                        route,
                        "match.custom",
                        "a parameter name must not be empty",
                    ));
                }
                let field = format!("custom.{name}");
                custom.push((name.clone(), patterns(&field, &Some(value.clone()))?));
            }
        }
        Ok(Self {
            protocol,
            agent_id: patterns("agent_id", &spec.agent_id)?,
            agent_type: patterns("agent_type", &spec.agent_type)?,
            site_id: patterns("site_id", &spec.site_id)?,
            callee: patterns("callee", &spec.callee)?,
            caller: patterns("caller", &spec.caller)?,
            custom,
        })
    }

    fn matches(&self, call: &CallFacts<'_>) -> bool {
        fn any(patterns: &[Pattern], value: Option<&str>) -> bool {
            patterns.is_empty() || value.is_some_and(|v| patterns.iter().any(|p| p.matches(v)))
        }
        (self.protocol.is_empty() || self.protocol.contains(&call.protocol))
            && any(&self.agent_id, call.agent_id)
            && any(&self.agent_type, call.agent_type)
            && any(&self.site_id, call.site_id)
            && any(&self.callee, Some(call.callee))
            && any(&self.caller, Some(call.caller))
            && self.custom.iter().all(|(name, patterns)| {
                any(
                    patterns,
                    call.custom.and_then(|c| c.get(name)).map(String::as_str),
                )
            })
    }

    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_default() {
            return f.write_str("(default: every call)");
        }
        let mut parts: Vec<String> = Vec::new();
        if !self.protocol.is_empty() {
            let all: Vec<&str> = self.protocol.iter().map(|p| p.as_str()).collect();
            parts.push(format!("protocol={}", all.join("|")));
        }
        for (key, patterns) in [
            ("agent_id", &self.agent_id),
            ("agent_type", &self.agent_type),
            ("site_id", &self.site_id),
            ("callee", &self.callee),
            ("caller", &self.caller),
        ] {
            if !patterns.is_empty() {
                let all: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
                parts.push(format!("{key}={}", all.join("|")));
            }
        }
        for (name, patterns) in &self.custom {
            let all: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
            parts.push(format!("custom.{name}={}", all.join("|")));
        }
        f.write_str(&parts.join(" "))
    }
}

/// A route, its agent built and ready.
#[derive(Clone)]
pub struct Route {
    /// The route's name.
    pub name: Arc<str>,
    /// The agent's name.
    pub agent: Arc<str>,
    /// Makes the agent of each call.
    pub factory: Arc<dyn AgentFactory>,
    matcher: Matcher,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("name", &self.name)
            .field("agent", &self.agent)
            .field("matcher", &self.matcher)
            .finish_non_exhaustive()
    }
}

impl Route {
    /// The route's `match`, as text (`protocol=callbridge agent_id=sales|sales-2`).
    pub fn describe_match(&self) -> String {
        self.matcher.to_string()
    }
}

/// The routes in force, in order.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

/// The name of the route `--agent NAME` (or an embedder's single agent) makes.
pub const DEFAULT_ROUTE: &str = "default";

impl RouteTable {
    /// Builds and validates a table: names present and unique, patterns valid, no route after
    /// the default, every agent known and its settings valid.
    pub fn build(specs: &[RouteSpec], catalog: &Catalog) -> Result<Self, RouteError> {
        let mut names = HashSet::new();
        let mut routes = Vec::with_capacity(specs.len());
        let mut default: Option<&str> = None;
        for (i, spec) in specs.iter().enumerate() {
            let label = if spec.name.is_empty() {
                format!("routes[{i}]")
            } else {
                spec.name.clone()
            };
            if spec.name.trim().is_empty() {
                return Err(RouteError::new(&label, "name", "must not be empty"));
            }
            if !names.insert(spec.name.as_str()) {
                return Err(RouteError::new(
                    &label,
                    "name",
                    "another route already has this name",
                ));
            }
            if let Some(d) = default {
                return Err(RouteError::new(
                    &label,
                    "match",
                    format!(
                        "comes after the default route {d:?} (a route without match), so it could never match"
                    ),
                ));
            }
            let matcher = match &spec.matcher {
                Some(m) => Matcher::compile(&label, m)?,
                None => Matcher::default(),
            };
            if matcher.is_default() {
                default = Some(&spec.name);
            }
            let factory = catalog
                .build(&spec.agent, &spec.settings)
                .map_err(|e| match e {
                    callgate_agent::Error::Settings { error, .. } => RouteError::new(
                        &label,
                        if error.field.is_empty() {
                            "settings".to_owned()
                        } else {
                            format!("settings.{}", error.field)
                        },
                        error.problem,
                    ),
                    other => RouteError::new(&label, "agent", other.to_string()),
                })?;
            routes.push(Route {
                name: spec.name.as_str().into(),
                agent: spec.agent.as_str().into(),
                factory,
                matcher,
            });
        }
        Ok(Self { routes })
    }

    /// One default route running `factory`.
    pub fn single(name: &str, factory: Arc<dyn AgentFactory>) -> Self {
        Self {
            routes: vec![Route {
                name: name.into(),
                agent: factory.name().into(),
                factory,
                matcher: Matcher::default(),
            }],
        }
    }

    /// The route a call takes: the first that matches.
    pub fn route(&self, call: &CallFacts<'_>) -> Option<&Route> {
        self.route_for(call, None)
    }

    /// The route a call takes among `allowed` (by name; `None`: all): the first that matches.
    pub fn route_for(&self, call: &CallFacts<'_>, allowed: Option<&[String]>) -> Option<&Route> {
        self.routes.iter().find(|r| {
            allowed.is_none_or(|names| names.iter().any(|n| **n == *r.name))
                && r.matcher.matches(call)
        })
    }

    /// The routes, in order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Whether a route takes every call.
    pub fn has_default(&self) -> bool {
        self.routes.iter().any(|r| r.matcher.is_default())
    }
}

/// The route table in force, replaceable while calls run. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RouteHandle {
    table: Arc<RwLock<Arc<RouteTable>>>,
}

impl RouteHandle {
    /// A handle on `table`.
    pub fn new(table: RouteTable) -> Self {
        Self {
            table: Arc::new(RwLock::new(Arc::new(table))),
        }
    }

    /// The table in force now (a call keeps the one it started with).
    pub fn current(&self) -> Arc<RouteTable> {
        // Replacing an Arc cannot leave the lock's value invalid, even if a holder panicked.
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `table` in force for calls that start from now on.
    pub fn replace(&self, table: RouteTable) {
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec(value: serde_json::Value) -> RouteSpec {
        parse_spec(value, 0).unwrap()
    }

    fn facts<'a>(protocol: Protocol, agent_id: Option<&'a str>, callee: &'a str) -> CallFacts<'a> {
        CallFacts {
            protocol,
            caller: "01012341234",
            callee,
            agent_id,
            agent_type: agent_id.map(|_| "voice"),
            site_id: agent_id.map(|_| "site-7"),
            custom: None,
        }
    }

    #[test]
    fn twilio_calls_match_on_protocol_and_custom_parameters() {
        let table = RouteTable::build(
            &[
                spec(json!({"name": "spring", "agent": "tone",
                    "match": {"protocol": "twilio", "custom": {"campaign": "spring*", "lang": ["en", "fr"]}}})),
                spec(json!({"name": "any-campaign", "agent": "echo",
                    "match": {"custom": {"campaign": "*"}}})),
                spec(json!({"name": "twilio", "agent": "echo", "match": {"protocol": "twilio"}})),
            ],
            &Catalog::builtin(),
        )
        .unwrap();
        let params = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let route = |custom: &BTreeMap<String, String>| {
            let f = CallFacts {
                custom: Some(custom),
                ..facts(Protocol::Twilio, None, "1")
            };
            table.route(&f).map(|r| r.name.to_string())
        };
        assert_eq!(
            route(&params(&[("campaign", "spring-26"), ("lang", "fr")])).as_deref(),
            Some("spring")
        );
        // Every named parameter must match; a missing one never does.
        assert_eq!(
            route(&params(&[("campaign", "spring-26"), ("lang", "de")])).as_deref(),
            Some("any-campaign")
        );
        assert_eq!(route(&params(&[("lang", "en")])).as_deref(), Some("twilio"));
        // Other protocols carry no custom parameters.
        assert!(table.route(&facts(Protocol::Inbound, None, "1")).is_none());
        assert_eq!(
            table.routes()[0].describe_match(),
            "protocol=twilio custom.campaign=spring* custom.lang=en|fr"
        );
        let e = RouteTable::build(
            &[spec(
                json!({"name": "c", "agent": "echo", "match": {"custom": {"x": "a*b"}}}),
            )],
            &Catalog::builtin(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("match.custom.x") && e.contains("only at the end"),
            "{e}"
        );
        let e = RouteTable::build(
            &[spec(
                json!({"name": "c", "agent": "echo", "match": {"custom": {}}}),
            )],
            &Catalog::builtin(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("match.custom"), "{e}");
    }

    #[test]
    fn first_match_wins_and_the_default_takes_the_rest() {
        let table = RouteTable::build(
            &[
                spec(json!({"name": "sales", "agent": "tone",
                    "match": {"protocol": "callbridge", "agent_id": ["sales", "sales-2"]},
                    "settings": {"frequency_hz": 600}})),
                spec(json!({"name": "dids", "agent": "echo", "match": {"callee": "0700*"}})),
                spec(json!({"name": "fallback", "agent": "echo"})),
            ],
            &Catalog::builtin(),
        )
        .unwrap();
        let name = |f: CallFacts<'_>| table.route(&f).map(|r| r.name.to_string());
        assert_eq!(
            name(facts(Protocol::CallBridge, Some("sales-2"), "1")).as_deref(),
            Some("sales")
        );
        assert_eq!(
            name(facts(Protocol::Inbound, None, "07001")).as_deref(),
            Some("dids")
        );
        assert_eq!(
            name(facts(Protocol::CallBridge, Some("x"), "0700")).as_deref(),
            Some("dids")
        );
        assert_eq!(
            name(facts(Protocol::Inbound, None, "0212")).as_deref(),
            Some("fallback")
        );
        // An inbound call has no agentId: a route that asks for one never takes it.
        let only = RouteTable::build(
            &[spec(
                json!({"name": "s", "agent": "echo", "match": {"agent_id": "*"}}),
            )],
            &Catalog::builtin(),
        )
        .unwrap();
        assert!(only.route(&facts(Protocol::Inbound, None, "1")).is_none());
        assert!(
            only.route(&facts(Protocol::CallBridge, Some("a"), "1"))
                .is_some()
        );
        assert!(!only.has_default());
    }

    #[test]
    fn bad_tables_name_the_route_and_the_field() {
        let catalog = Catalog::builtin();
        let err = |specs: Vec<serde_json::Value>| -> String {
            let specs: Result<Vec<RouteSpec>, RouteError> = specs
                .into_iter()
                .enumerate()
                .map(|(i, v)| parse_spec(v, i))
                .collect();
            match specs {
                Err(e) => e.to_string(),
                Ok(specs) => RouteTable::build(&specs, &catalog).unwrap_err().to_string(),
            }
        };
        let e = err(vec![
            json!({"name": "a", "agent": "echo", "match": {"agentid": "x"}}),
        ]);
        assert!(
            e.contains("route \"a\"") && e.contains("match.agentid"),
            "{e}"
        );
        let e = err(vec![json!({"name": "a", "agent": "nope"})]);
        assert!(
            e.contains("route \"a\": agent: unknown agent \"nope\""),
            "{e}"
        );
        let e = err(vec![
            json!({"name": "a", "agent": "echo", "match": {"callee": "07*1"}}),
        ]);
        assert!(
            e.contains("match.callee") && e.contains("only at the end"),
            "{e}"
        );
        let e = err(vec![
            json!({"name": "a", "agent": "echo", "match": {"callee": "1"}}),
            json!({"name": "a", "agent": "echo"}),
        ]);
        assert!(e.contains("route \"a\": name: another route"), "{e}");
        let e = err(vec![
            json!({"name": "d", "agent": "echo"}),
            json!({"name": "late", "agent": "echo", "match": {"callee": "1"}}),
        ]);
        assert!(
            e.contains("route \"late\"") && e.contains("could never match"),
            "{e}"
        );
        let e = err(vec![
            json!({"name": "t", "agent": "tone", "settings": {"frequency_hz": "x"}}),
        ]);
        assert!(e.contains("route \"t\": settings.frequency_hz"), "{e}");
        let e = err(vec![
            json!({"name": "t", "agent": "tone", "settings": {"bogus": 1}}),
        ]);
        assert!(
            e.contains("route \"t\": settings") && e.contains("bogus"),
            "{e}"
        );
        let e = err(vec![json!({"agent": "echo"})]);
        assert!(e.contains("routes[0]") && e.contains("name"), "{e}");
        let e = err(vec![
            json!({"name": "p", "agent": "echo", "match": {"protocol": "sip"}}),
        ]);
        assert!(e.contains("match.protocol") && e.contains("\"sip\""), "{e}");
        let e = err(vec![
            json!({"name": "p", "agent": "echo", "match": {"caller": 5}}),
        ]);
        assert!(e.contains("match.caller"), "{e}");
    }

    #[test]
    fn a_replaced_table_serves_new_calls_and_old_holders_keep_theirs() {
        let catalog = Catalog::builtin();
        let handle = RouteHandle::new(RouteTable::single(
            "default",
            catalog.build("echo", &serde_json::Value::Null).unwrap(),
        ));
        let before = handle.current();
        handle.replace(
            RouteTable::build(&[spec(json!({"name": "t", "agent": "tone"}))], &catalog).unwrap(),
        );
        assert_eq!(&*before.routes()[0].name, "default");
        assert_eq!(&*handle.current().routes()[0].name, "t");
    }
}
