//! Deployments: what a `deployments.yaml` declares, parsed and checked before anything starts.
//!
//! A deployment is one model id clients send (`model`), the file that serves it, how many
//! replicas it may run (`min_replicas` may be 0: scale to zero), the autoscaler's targets, the
//! activator's queue, and the routing policy among its replicas. Every mistake in the file is
//! reported with its line and the field's path (`deployments[1].max_replicas`), and the first
//! one stops the program before it serves anything.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lastmile_router::PolicyKind;
use serde::de::{self, Deserializer};
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::autoscaler::AutoscalerConfig;
use crate::ControlError;

/// One deployment, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentSpec {
    /// The model id clients send; unique in the file.
    pub name: String,
    /// The model file (GGUF) or folder; `None`: the embedded default model.
    pub model: Option<PathBuf>,
    /// Replicas kept running however idle (0: the deployment scales to zero).
    pub min_replicas: usize,
    /// Most replicas the autoscaler may run.
    pub max_replicas: usize,
    /// How requests are spread over the replicas.
    pub routing: PolicyKind,
    /// Compute threads per replica (`None`: the machine's cores divided by `max_replicas`).
    pub threads: Option<usize>,
    /// Requests the activator holds while no replica is ready; more get 503.
    pub queue: usize,
    /// How long a held request waits for a replica before it gets 503 with `Retry-After`.
    pub hold_timeout: Duration,
    /// The autoscaler's targets and windows.
    pub autoscaling: AutoscalerConfig,
    /// Extra `lastmile serve` options for each replica (e.g. `["--kv-cache-mib", "512"]`).
    pub args: Vec<String>,
}

impl DeploymentSpec {
    /// A deployment of `model` (`None`: the default model) always at `replicas` replicas (no
    /// scaling, never to zero; a crashed replica is replaced), routed `kv_aware`: what
    /// `lastmile serve --workers N` runs.
    pub fn fixed(name: impl Into<String>, model: Option<PathBuf>, replicas: usize) -> Self {
        Self {
            name: name.into(),
            model,
            min_replicas: replicas,
            max_replicas: replicas,
            routing: PolicyKind::KvAware,
            threads: None,
            queue: 1024,
            // As long as the controller waits for a replica to become ready.
            hold_timeout: Duration::from_secs(120),
            autoscaling: AutoscalerConfig::new(replicas, replicas),
            args: Vec::new(),
        }
    }
}

/// A file of deployments.
#[derive(Debug, Clone, PartialEq)]
pub struct Deployments {
    /// In file order.
    pub list: Vec<DeploymentSpec>,
}

impl Deployments {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ControlError> {
        let text = std::fs::read_to_string(path).map_err(|e| ControlError::Config {
            at: path.display().to_string(),
            message: format!("cannot read the file: {e}"),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks YAML `text`; `source` names it in errors (a path).
    pub fn parse(text: &str, source: &str) -> Result<Self, ControlError> {
        let file: FileYaml = serde_saphyr::from_str(text).map_err(|e| {
            let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            ControlError::Config {
                at: format!("{source}:{line}:{column}"),
                message: bare_message(&e.without_snippet().to_string()),
            }
        })?;
        let mut list: Vec<DeploymentSpec> = Vec::with_capacity(file.deployments.len());
        if file.deployments.is_empty() {
            return Err(ControlError::Config {
                at: format!("{source}:1:1"),
                message: "`deployments` lists no deployment".into(),
            });
        }
        for (i, d) in file.deployments.into_iter().enumerate() {
            let spec = d.check(i, source)?;
            if list.iter().any(|other| other.name == spec.name) {
                return Err(ControlError::Config {
                    at: format!("{source}:{}:{}", d_line(text, &spec.name), 1),
                    message: format!(
                        "deployments[{i}].name: {:?} is declared twice (names are the model ids \
                         clients send, so they must be unique)",
                        spec.name
                    ),
                });
            }
            list.push(spec);
        }
        Ok(Self { list })
    }

    /// The deployment clients call `name`.
    pub fn get(&self, name: &str) -> Option<&DeploymentSpec> {
        self.list.iter().find(|d| d.name == name)
    }
}

/// The line of the second `name: NAME` in `text` (for the duplicate-name error).
fn d_line(text: &str, name: &str) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let l = l.trim_start().trim_start_matches("- ").trim();
            l.strip_prefix("name:")
                .is_some_and(|v| v.trim().trim_matches(['"', '\'']) == name)
        })
        .nth(1)
        .map_or(0, |(i, _)| i + 1)
}

/// The parser's message without its "error: line L column C: " prefix (the location is
/// reported separately, in `file:line:column` form).
fn bare_message(rendered: &str) -> String {
    let first = rendered.lines().next().unwrap_or(rendered);
    match first.strip_prefix("error: line ") {
        Some(rest) => rest
            .split_once(": ")
            .map_or(first.to_string(), |(_, m)| m.to_string()),
        None => first.to_string(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileYaml {
    deployments: Vec<DeploymentYaml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeploymentYaml {
    name: Spanned<String>,
    #[serde(default)]
    model: Option<Spanned<String>>,
    #[serde(default)]
    min_replicas: Option<Spanned<usize>>,
    #[serde(default)]
    max_replicas: Option<Spanned<usize>>,
    #[serde(default)]
    target_concurrency: Option<Spanned<f64>>,
    #[serde(default)]
    idle_timeout: Option<Spanned<Seconds>>,
    #[serde(default)]
    routing: Option<Spanned<String>>,
    #[serde(default)]
    threads: Option<Spanned<usize>>,
    #[serde(default)]
    queue: Option<Spanned<usize>>,
    #[serde(default)]
    hold_timeout: Option<Spanned<Seconds>>,
    #[serde(default)]
    autoscaling: Option<AutoscalingYaml>,
    #[serde(default)]
    args: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AutoscalingYaml {
    #[serde(default)]
    stable_window: Option<Spanned<Seconds>>,
    #[serde(default)]
    panic_window: Option<Spanned<Seconds>>,
    #[serde(default)]
    panic_threshold: Option<Spanned<f64>>,
    #[serde(default)]
    scale_down_delay: Option<Spanned<Seconds>>,
    #[serde(default)]
    max_scale_up_rate: Option<Spanned<f64>>,
    #[serde(default)]
    max_scale_down_rate: Option<Spanned<f64>>,
    #[serde(default)]
    ttft_p90_target: Option<Spanned<Seconds>>,
    #[serde(default)]
    itl_p90_target: Option<Spanned<Seconds>>,
}

/// Checks one field; the error names the file, line, column and field path.
struct FieldCheck<'a> {
    source: &'a str,
    prefix: String,
}

impl FieldCheck<'_> {
    fn fail<T>(
        &self,
        field: &str,
        at: &Spanned<T>,
        message: impl std::fmt::Display,
    ) -> ControlError {
        ControlError::Config {
            at: format!(
                "{}:{}:{}",
                self.source,
                at.referenced.line(),
                at.referenced.column()
            ),
            message: format!("{}.{field}: {message}", self.prefix),
        }
    }
}

impl DeploymentYaml {
    fn check(self, i: usize, source: &str) -> Result<DeploymentSpec, ControlError> {
        let f = FieldCheck {
            source,
            prefix: format!("deployments[{i}]"),
        };
        let name = self.checked_name(&f)?;
        let model = self.checked_model(&f)?;
        let (min_replicas, max_replicas) = self.checked_replicas(&f)?;
        let target = positive(&f, "target_concurrency", &self.target_concurrency, 8.0)?;
        let routing = match &self.routing {
            None => PolicyKind::KvAware,
            Some(r) => r
                .value
                .parse()
                .map_err(|e: String| f.fail("routing", r, e))?,
        };
        if let Some(t) = self.threads.as_ref().filter(|t| t.value == 0) {
            return Err(f.fail("threads", t, "must be at least 1"));
        }
        if let Some(q) = self.queue.as_ref().filter(|q| q.value == 0) {
            return Err(f.fail("queue", q, "must be at least 1"));
        }
        let af = FieldCheck {
            source,
            prefix: format!("deployments[{i}].autoscaling"),
        };
        let mut autoscaling = self.autoscaling.unwrap_or_default().check(&af)?;
        autoscaling.min_replicas = min_replicas;
        autoscaling.max_replicas = max_replicas;
        autoscaling.target_concurrency = target;
        autoscaling.idle_timeout = match &self.idle_timeout {
            None => Duration::from_secs(300),
            Some(_) => duration(&f, "idle_timeout", &self.idle_timeout, 0.0)?,
        };
        Ok(DeploymentSpec {
            name,
            model,
            min_replicas,
            max_replicas,
            routing,
            threads: self.threads.map(|t| t.value),
            queue: self.queue.map_or(256, |q| q.value),
            hold_timeout: match &self.hold_timeout {
                None => Duration::from_secs(60),
                Some(_) => duration(&f, "hold_timeout", &self.hold_timeout, 0.0)?,
            },
            autoscaling,
            args: self.args,
        })
    }

    /// `name`: a model id clients can send (no spaces or control characters).
    fn checked_name(&self, f: &FieldCheck<'_>) -> Result<String, ControlError> {
        let name = self.name.value.trim().to_string();
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(f.fail(
                "name",
                &self.name,
                "must be a non-empty model id without spaces",
            ));
        }
        Ok(name)
    }

    /// `model`: a path, or `default` (or nothing) for the default model.
    fn checked_model(&self, f: &FieldCheck<'_>) -> Result<Option<PathBuf>, ControlError> {
        Ok(match &self.model {
            None => None,
            Some(m) if m.value == "default" => None,
            Some(m) if m.value.trim().is_empty() => {
                return Err(f.fail("model", m, "must be a path, or `default`"))
            }
            Some(m) => Some(PathBuf::from(&m.value)),
        })
    }

    /// `min_replicas` and `max_replicas`: at most 64, max at least 1 and at least min.
    fn checked_replicas(&self, f: &FieldCheck<'_>) -> Result<(usize, usize), ControlError> {
        let min_replicas = self.min_replicas.as_ref().map_or(0, |s| s.value);
        let max_replicas = match &self.max_replicas {
            None => min_replicas.max(1),
            Some(s) if s.value == 0 => {
                return Err(f.fail("max_replicas", s, "must be at least 1"));
            }
            Some(s) if s.value < min_replicas => {
                return Err(f.fail(
                    "max_replicas",
                    s,
                    format!("must be at least min_replicas ({min_replicas})"),
                ));
            }
            Some(s) => s.value,
        };
        if max_replicas > 64 {
            let at = self.max_replicas.as_ref().or(self.min_replicas.as_ref());
            if let Some(at) = at {
                return Err(f.fail("max_replicas", at, "at most 64 local replicas"));
            }
        }
        Ok((min_replicas, max_replicas))
    }
}

impl AutoscalingYaml {
    /// The autoscaler's windows, thresholds, rates and latency targets (the replica bounds,
    /// target concurrency and idle timeout are the deployment's: the caller sets them).
    fn check(self, af: &FieldCheck<'_>) -> Result<AutoscalerConfig, ControlError> {
        let a = self;
        let stable_window = duration(af, "stable_window", &a.stable_window, 60.0)?;
        let panic_window = duration(af, "panic_window", &a.panic_window, 6.0)?;
        if panic_window > stable_window {
            if let Some(at) = &a.panic_window {
                return Err(af.fail(
                    "panic_window",
                    at,
                    format!(
                        "must not be longer than stable_window ({:?})",
                        stable_window
                    ),
                ));
            }
        }
        let ttft_p90_target = match &a.ttft_p90_target {
            None => None,
            Some(_) => Some(duration(af, "ttft_p90_target", &a.ttft_p90_target, 0.0)?),
        };
        let itl_p90_target = match &a.itl_p90_target {
            None => None,
            Some(_) => Some(duration(af, "itl_p90_target", &a.itl_p90_target, 0.0)?),
        };
        Ok(AutoscalerConfig {
            min_replicas: 0,
            max_replicas: 1,
            target_concurrency: 1.0,
            stable_window,
            panic_window,
            panic_threshold: at_least(af, "panic_threshold", &a.panic_threshold, 2.0, 1.0)?,
            scale_down_delay: a
                .scale_down_delay
                .as_ref()
                .map_or(Duration::ZERO, |s| s.value.0),
            max_scale_up_rate: at_least(
                af,
                "max_scale_up_rate",
                &a.max_scale_up_rate,
                1000.0,
                1.0,
            )?,
            max_scale_down_rate: at_least(
                af,
                "max_scale_down_rate",
                &a.max_scale_down_rate,
                2.0,
                1.0,
            )?,
            idle_timeout: Duration::ZERO,
            ttft_p90_target,
            itl_p90_target,
        })
    }
}

fn positive(
    f: &FieldCheck<'_>,
    field: &str,
    v: &Option<Spanned<f64>>,
    default: f64,
) -> Result<f64, ControlError> {
    match v {
        None => Ok(default),
        Some(s) if s.value.is_finite() && s.value > 0.0 => Ok(s.value),
        Some(s) => Err(f.fail(field, s, "must be a positive number")),
    }
}

fn at_least(
    f: &FieldCheck<'_>,
    field: &str,
    v: &Option<Spanned<f64>>,
    default: f64,
    least: f64,
) -> Result<f64, ControlError> {
    match v {
        None => Ok(default),
        Some(s) if s.value.is_finite() && s.value >= least => Ok(s.value),
        Some(s) => Err(f.fail(field, s, format!("must be a number of at least {least}"))),
    }
}

/// A positive duration (`default` seconds when absent).
fn duration(
    f: &FieldCheck<'_>,
    field: &str,
    v: &Option<Spanned<Seconds>>,
    default: f64,
) -> Result<Duration, ControlError> {
    match v {
        None => Ok(Duration::from_secs_f64(default)),
        Some(s) if s.value.0.is_zero() => Err(f.fail(field, s, "must be longer than 0")),
        Some(s) => Ok(s.value.0),
    }
}

/// A duration written as seconds (`30`, `0.5`) or with a unit (`500ms`, `30s`, `5m`, `1h`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Seconds(Duration);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Seconds;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration such as 30s, 500ms, 5m or a number of seconds")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seconds, E> {
                Ok(Seconds(Duration::from_secs(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seconds, E> {
                u64::try_from(v)
                    .map(|v| Seconds(Duration::from_secs(v)))
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Seconds, E> {
                Duration::try_from_secs_f64(v)
                    .map(Seconds)
                    .map_err(|_| E::custom("a duration must be a non-negative number of seconds"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Seconds, E> {
                parse_duration(v).map(Seconds).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `500ms`, `30s`, `5m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 500ms, 5m)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "m" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} in {s:?} (ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(n * scale).map_err(|_| format!("{s:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
deployments:
  - name: smollm2
    min_replicas: 0
    max_replicas: 3
    target_concurrency: 4
    idle_timeout: 90s
    routing: least_loaded
    threads: 1
    hold_timeout: 500ms
    autoscaling:
      stable_window: 2m
      panic_window: 5
      ttft_p90_target: 800ms
      itl_p90_target: 60ms
    args: [\"--kv-cache-mib\", \"256\"]
  - name: other
    model: /models/other.gguf
    min_replicas: 1
";

    fn error(text: &str) -> String {
        match Deployments::parse(text, "d.yaml") {
            Err(e) => e.to_string(),
            Ok(d) => panic!("accepted: {d:?}"),
        }
    }

    #[test]
    fn a_full_file_parses_with_defaults_filled_in() {
        let d = Deployments::parse(GOOD, "d.yaml").expect("valid");
        assert_eq!(d.list.len(), 2);
        let a = &d.list[0];
        assert_eq!(a.name, "smollm2");
        assert_eq!(a.model, None);
        assert_eq!((a.min_replicas, a.max_replicas), (0, 3));
        assert_eq!(a.routing, PolicyKind::LeastLoaded);
        assert_eq!(a.threads, Some(1));
        assert_eq!(a.hold_timeout, Duration::from_millis(500));
        assert_eq!(a.autoscaling.target_concurrency, 4.0);
        assert_eq!(a.autoscaling.idle_timeout, Duration::from_secs(90));
        assert_eq!(a.autoscaling.stable_window, Duration::from_secs(120));
        assert_eq!(a.autoscaling.panic_window, Duration::from_secs(5));
        assert_eq!(
            a.autoscaling.ttft_p90_target,
            Some(Duration::from_millis(800))
        );
        assert_eq!(
            a.autoscaling.itl_p90_target,
            Some(Duration::from_millis(60))
        );
        assert_eq!(a.args, ["--kv-cache-mib", "256"]);
        let b = d.get("other").expect("second deployment");
        assert_eq!(b.model.as_deref(), Some(Path::new("/models/other.gguf")));
        assert_eq!((b.min_replicas, b.max_replicas), (1, 1));
        assert_eq!(b.routing, PolicyKind::KvAware);
        assert_eq!(b.queue, 256);
    }

    #[test]
    fn errors_name_the_line_and_the_field() {
        let bad_max = GOOD.replace("max_replicas: 3", "max_replicas: 0");
        assert_eq!(
            error(&bad_max),
            "d.yaml:4:19: deployments[0].max_replicas: must be at least 1"
        );
        let below_min = GOOD.replace("min_replicas: 1", "min_replicas: 2\n    max_replicas: 1");
        assert_eq!(
            error(&below_min),
            "d.yaml:19:19: deployments[1].max_replicas: must be at least min_replicas (2)"
        );
        let unknown = GOOD.replace("threads: 1", "thread: 1");
        let e = error(&unknown);
        assert!(e.starts_with("d.yaml:8:5: unknown field `thread`"), "{e}");
        let policy = GOOD.replace("least_loaded", "fastest");
        let e = error(&policy);
        assert!(
            e.starts_with("d.yaml:7:14: deployments[0].routing: unknown routing policy"),
            "{e}"
        );
        let unit = GOOD.replace("90s", "90 days");
        let e = error(&unit);
        assert!(
            e.starts_with("d.yaml:6:") && e.contains("unknown duration unit"),
            "{e}"
        );
        let window = GOOD.replace("panic_window: 5", "panic_window: 3m");
        let e = error(&window);
        assert!(
            e.starts_with(
                "d.yaml:12:21: deployments[0].autoscaling.panic_window: must not be longer"
            ),
            "{e}"
        );
        let not_number = GOOD.replace("target_concurrency: 4", "target_concurrency: lots");
        let e = error(&not_number);
        assert!(e.starts_with("d.yaml:5:"), "{e}");
        let twice = GOOD.replace("name: other", "name: smollm2");
        assert_eq!(
            error(&twice),
            "d.yaml:16:1: deployments[1].name: \"smollm2\" is declared twice (names are the model \
             ids clients send, so they must be unique)"
        );
        let missing = "deployments:\n  - min_replicas: 1\n";
        let e = error(missing);
        assert!(e.starts_with("d.yaml:2:5: missing field `name`"), "{e}");
        assert!(error("deployments: []\n").contains("lists no deployment"));
        assert!(error("deployments: [\n").starts_with("d.yaml:1:"));
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("s").is_err());
    }
}
