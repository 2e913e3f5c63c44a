//! Templates: what a sandbox starts from — a root file system, default resources and an
//! optional start command — and whether it serves the code interpreter.
//!
//! The built-ins use the host's `/usr` read-only (with Python 3): `base` (the E2B SDK's
//! default) and `code-interpreter-v1` (the `e2b-code-interpreter` SDK's default, also
//! reachable as `code-interpreter`).

use std::path::PathBuf;

use crate::SandboxError;

/// One template.
#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    /// The id clients name (`templateID`).
    pub name: String,
    /// Other names for it.
    pub aliases: Vec<String>,
    /// A folder holding `usr/` (and optionally `etc/`) to mount read-only; `None` = the host's.
    pub rootfs: Option<PathBuf>,
    /// CPU time, in cores.
    pub cpus: f64,
    /// Memory (files in the sandbox's tmpfs count), MiB.
    pub memory_mb: u64,
    /// Size of each writable file system (`/home/user`, `/tmp`), MiB.
    pub disk_mb: u64,
    /// Processes and threads at once.
    pub pids: u32,
    /// A command started in the background when a sandbox is created.
    pub start_cmd: Option<String>,
    /// Whether the code interpreter (`/execute`, `/contexts`) is served.
    pub code_interpreter: bool,
}

impl Template {
    /// A template on the host's `/usr` with the default resources.
    pub fn host(name: &str) -> Self {
        Self {
            name: name.into(),
            aliases: Vec::new(),
            rootfs: None,
            cpus: 1.0,
            memory_mb: 512,
            disk_mb: 512,
            pids: 256,
            start_cmd: None,
            code_interpreter: false,
        }
    }

    /// Refuses settings no sandbox could run with.
    pub fn validate(&self) -> Result<(), SandboxError> {
        let bad = |m: String| {
            Err(SandboxError::InvalidConfig(format!(
                "template `{}`: {m}",
                self.name
            )))
        };
        if self.name.is_empty() || self.name.len() > 128 {
            return bad("the name must have 1 to 128 characters".into());
        }
        if !(self.cpus > 0.0 && self.cpus <= 64.0) {
            return bad(format!("cpus must be in (0, 64], not {}", self.cpus));
        }
        if !(16..=1 << 20).contains(&self.memory_mb) {
            return bad(format!(
                "memory_mb must be 16..1048576, not {}",
                self.memory_mb
            ));
        }
        if !(1..=1 << 20).contains(&self.disk_mb) {
            return bad(format!("disk_mb must be 1..1048576, not {}", self.disk_mb));
        }
        if !(8..=1 << 20).contains(&self.pids) {
            return bad(format!("pids must be 8..1048576, not {}", self.pids));
        }
        if let Some(r) = &self.rootfs {
            if !r.join("usr").is_dir() {
                return bad(format!("rootfs {} has no usr/ folder", r.display()));
            }
        }
        Ok(())
    }

    /// Whether clients may call it `name`.
    pub fn answers_to(&self, name: &str) -> bool {
        self.name == name || self.aliases.iter().any(|a| a == name)
    }
}

/// One template as written in a templates file (`--sandbox-templates`); unset fields take the
/// host template's defaults.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateYaml {
    name: String,
    #[serde(default)]
    aliases: Vec<String>,
    rootfs: Option<PathBuf>,
    cpus: Option<f64>,
    memory_mb: Option<u64>,
    disk_mb: Option<u64>,
    pids: Option<u32>,
    start_cmd: Option<String>,
    #[serde(default)]
    code_interpreter: bool,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplatesFile {
    templates: Vec<TemplateYaml>,
}

/// Parses a templates file (`source` names it in errors, with line and column) and returns
/// the built-ins with its templates added; one with a built-in's name replaces it.
pub fn with_file(text: &str, source: &str) -> Result<Vec<Template>, SandboxError> {
    let file: TemplatesFile = serde_saphyr::from_str(text).map_err(|e| {
        let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        SandboxError::InvalidConfig(format!("{source}:{line}:{column}: {}", e.without_snippet()))
    })?;
    let mut all = builtin();
    for (i, t) in file.templates.into_iter().enumerate() {
        let d = Template::host(&t.name);
        let t = Template {
            name: t.name,
            aliases: t.aliases,
            rootfs: t.rootfs,
            cpus: t.cpus.unwrap_or(d.cpus),
            memory_mb: t.memory_mb.unwrap_or(d.memory_mb),
            disk_mb: t.disk_mb.unwrap_or(d.disk_mb),
            pids: t.pids.unwrap_or(d.pids),
            start_cmd: t.start_cmd,
            code_interpreter: t.code_interpreter,
        };
        t.validate()
            .map_err(|e| SandboxError::InvalidConfig(format!("{source}: templates[{i}]: {e}")))?;
        all.retain(|x| !x.answers_to(&t.name) && !t.aliases.iter().any(|a| x.answers_to(a)));
        all.push(t);
    }
    Ok(all)
}

/// The templates every server has.
pub fn builtin() -> Vec<Template> {
    let base = Template::host("base");
    let mut ci = Template::host("code-interpreter-v1");
    ci.aliases = vec!["code-interpreter".into()];
    ci.code_interpreter = true;
    ci.memory_mb = 1024;
    vec![base, ci]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_valid_and_answer_to_the_sdk_defaults() {
        let t = builtin();
        for x in &t {
            x.validate().unwrap();
        }
        assert!(t.iter().any(|x| x.answers_to("base")));
        assert!(t
            .iter()
            .any(|x| x.answers_to("code-interpreter-v1") && x.code_interpreter));
        assert!(t.iter().any(|x| x.answers_to("code-interpreter")));
    }

    #[test]
    fn a_templates_file_adds_and_replaces_with_defaults_filled() {
        let yaml = "templates:\n  - name: data\n    cpus: 2\n    start_cmd: python3 -m http.server\n  - name: base\n    memory_mb: 256\n";
        let t = with_file(yaml, "t.yaml").unwrap();
        let data = t.iter().find(|x| x.name == "data").unwrap();
        assert_eq!((data.cpus, data.memory_mb, data.pids), (2.0, 512, 256));
        assert_eq!(data.start_cmd.as_deref(), Some("python3 -m http.server"));
        let base: Vec<_> = t.iter().filter(|x| x.answers_to("base")).collect();
        assert_eq!(base.len(), 1);
        assert_eq!(base[0].memory_mb, 256);
        assert!(t.iter().any(|x| x.answers_to("code-interpreter-v1")));
    }

    #[test]
    fn a_bad_templates_file_names_where() {
        let e = with_file("templates:\n  - name: x\n    cpu: 2\n", "t.yaml").unwrap_err();
        assert!(e.to_string().contains("t.yaml:3"), "{e}");
        let e = with_file("templates:\n  - name: x\n    pids: 1\n", "t.yaml").unwrap_err();
        assert!(
            e.to_string().contains("templates[0]") && e.to_string().contains("pids"),
            "{e}"
        );
    }

    #[test]
    fn bad_resources_are_refused_with_the_field() {
        let mut t = Template::host("x");
        t.cpus = 0.0;
        assert!(t.validate().unwrap_err().to_string().contains("cpus"));
        let mut t = Template::host("x");
        t.pids = 1;
        assert!(t.validate().unwrap_err().to_string().contains("pids"));
    }
}
