//! The subset of Go `text/template` + sprig that Kairos cloud-configs use.
//!
//! Existing configs say `{{ .Values.node.hostname }}`, `{{ trunc 4 .MachineID }}`,
//! `{{ .Values.x | default "y" | upper }}` and `{{ if ... }}…{{ end }}`; this crate parses
//! and renders those forms over a `serde_json::Value` context. It is not a general Go
//! template engine: unsupported syntax is a parse error, which callers turn into "keep the
//! raw text and warn", as Kairos does for any template failure.

mod funcs;
mod parse;

use serde_json::Value;

pub use parse::Template;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("template parse error at byte {pos}: {msg}")]
    Parse { pos: usize, msg: String },
    #[error("template execution error: {0}")]
    Exec(String),
}

/// Options that differ between Kairos' two template users.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// `missingkey=error` (config_url templating): a missing map key is an error instead of
    /// `<no value>`.
    pub missing_key_error: bool,
}

/// Parses and renders `text` against `ctx` in one go.
pub fn render(text: &str, ctx: &Value) -> Result<String, Error> {
    render_with(text, ctx, Options::default())
}

pub fn render_with(text: &str, ctx: &Value, opts: Options) -> Result<String, Error> {
    Template::parse(text)?.render(ctx, opts)
}

/// True when `text` contains template actions worth rendering.
pub fn has_actions(text: &str) -> bool {
    text.contains("{{")
}

/// Renders `text`, or returns it unchanged when it fails, with the error for a warning.
/// This is yip's behaviour for every templated field.
pub fn render_or_raw(text: &str, ctx: &Value) -> (String, Option<Error>) {
    if !has_actions(text) {
        return (text.to_string(), None);
    }
    match render(text, ctx) {
        Ok(s) => (s, None),
        Err(e) => (text.to_string(), Some(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> Value {
        json!({
            "Values": {"node": {"hostname": "node1", "machineid": "abcdef1234"},
                        "list": ["a", "b"], "empty": "", "n": 3},
            "MachineID": "abcdef1234",
        })
    }

    fn r(t: &str) -> String {
        render(t, &ctx()).unwrap_or_else(|e| panic!("{t}: {e}"))
    }

    #[test]
    fn fields_and_text() {
        assert_eq!(r("host={{ .Values.node.hostname }}!"), "host=node1!");
        assert_eq!(r("{{.Values.node.hostname}}"), "node1");
        assert_eq!(r("no actions"), "no actions");
        assert_eq!(r("{{ .Values.missing }}"), "<no value>");
        assert_eq!(r("{{ .Values.n }}"), "3");
    }

    #[test]
    fn functions_and_pipelines() {
        assert_eq!(r("kairos-{{ trunc 4 .MachineID }}"), "kairos-abcd");
        assert_eq!(r("{{ .Values.missing | default \"x\" }}"), "x");
        assert_eq!(r("{{ .Values.empty | default \"x\" | upper }}"), "X");
        assert_eq!(r("{{ \"  Hi \" | trim | lower }}"), "hi");
        assert_eq!(r("{{ replace \"a\" \"b\" \"banana\" }}"), "bbnbnb");
        assert_eq!(r("{{ .Values.node.hostname | quote }}"), "\"node1\"");
        assert_eq!(r("{{ .Values.list | toJson }}"), "[\"a\",\"b\"]");
        assert_eq!(r("{{ printf \"%s-%d\" \"a\" 3 }}"), "a-3");
        assert_eq!(r("{{ join \",\" .Values.list }}"), "a,b");
        assert_eq!(r("{{ (index .Values.list 1) | upper }}"), "B");
        assert_eq!(r("{{ \"abc\" | b64enc }}"), "YWJj");
    }

    #[test]
    fn control_flow() {
        assert_eq!(
            r("{{ if eq .Values.node.hostname \"node1\" }}yes{{ else }}no{{ end }}"),
            "yes"
        );
        assert_eq!(
            r("{{ if .Values.empty }}yes{{ else if .Values.n }}n{{ end }}"),
            "n"
        );
        assert_eq!(r("{{ range .Values.list }}[{{ . }}]{{ end }}"), "[a][b]");
        assert_eq!(
            r("{{ range $i, $v := .Values.list }}{{ $i }}={{ $v }} {{ end }}"),
            "0=a 1=b "
        );
        assert_eq!(
            r("{{ with .Values.node }}{{ .hostname }}{{ end }}"),
            "node1"
        );
        assert_eq!(r("{{ $h := .Values.node.hostname }}{{ $h }}"), "node1");
        assert_eq!(r("a  {{- /* c */ -}}  b"), "ab");
        assert_eq!(
            r("{{ if and .Values.n (not .Values.empty) }}ok{{ end }}"),
            "ok"
        );
    }

    #[test]
    fn failures_are_errors_and_raw_is_kept() {
        assert!(render("{{ .Values.node.hostname ", &ctx()).is_err());
        assert!(render("{{ nosuchfunc 1 }}", &ctx()).is_err());
        assert!(render("{{ if 1 }}", &ctx()).is_err());
        let (out, err) = render_or_raw("x {{ bad", &ctx());
        assert_eq!(out, "x {{ bad");
        assert!(err.is_some());
        let opts = Options {
            missing_key_error: true,
        };
        assert!(render_with("{{ .Values.nope }}", &ctx(), opts).is_err());
    }
}
