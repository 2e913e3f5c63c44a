//! Structured output: what a request says its output must look like. OpenAI's `response_format`
//! (`text`, `json_object`, `json_schema`) and the vLLM-style extension fields `guided_json`,
//! `guided_regex`, `guided_choice` and `guided_grammar` (a Lark grammar) all become one
//! [`OutputConstraint`], which the server enforces by constrained decoding.

use serde_json::Value;

use crate::error::ApiError;

/// The shape the output must have.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputConstraint {
    /// Any JSON object.
    JsonObject,
    /// JSON valid against this schema.
    JsonSchema(Value),
    /// Text matching this regular expression.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// Text in the language of this Lark grammar.
    Grammar(String),
}

/// The constraint-related fields of a request, as sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConstraintFields<'a> {
    /// `response_format`.
    pub response_format: Option<&'a Value>,
    /// `guided_json`: a JSON Schema (object) or its JSON text.
    pub guided_json: Option<&'a Value>,
    /// `guided_regex`.
    pub guided_regex: Option<&'a str>,
    /// `guided_choice`.
    pub guided_choice: Option<&'a [String]>,
    /// `guided_grammar` (Lark).
    pub guided_grammar: Option<&'a str>,
}

impl ConstraintFields<'_> {
    /// The parameter the constraint came from, for error messages about it.
    pub fn param(&self) -> &'static str {
        let text = self
            .response_format
            .and_then(|f| f.get("type"))
            .and_then(Value::as_str)
            == Some("text");
        if self.response_format.is_some() && !text {
            "response_format"
        } else if self.guided_json.is_some() {
            "guided_json"
        } else if self.guided_regex.is_some() {
            "guided_regex"
        } else if self.guided_choice.is_some() {
            "guided_choice"
        } else if self.guided_grammar.is_some() {
            "guided_grammar"
        } else {
            "response_format"
        }
    }

    /// The one constraint the request asks for, if any; two at once is an error.
    pub fn parse(&self) -> Result<Option<OutputConstraint>, ApiError> {
        let mut found: Vec<(&str, OutputConstraint)> = Vec::new();
        if let Some(format) = self.response_format {
            if let Some(c) = parse_response_format(format)? {
                found.push(("response_format", c));
            }
        }
        if let Some(schema) = self.guided_json {
            found.push((
                "guided_json",
                OutputConstraint::JsonSchema(schema_value(schema)?),
            ));
        }
        if let Some(rx) = self.guided_regex {
            found.push(("guided_regex", OutputConstraint::Regex(rx.to_owned())));
        }
        if let Some(choices) = self.guided_choice {
            if choices.is_empty() {
                return Err(ApiError::invalid_request(
                    "guided_choice must list at least one string",
                    Some("guided_choice"),
                ));
            }
            found.push(("guided_choice", OutputConstraint::Choice(choices.to_vec())));
        }
        if let Some(g) = self.guided_grammar {
            found.push(("guided_grammar", OutputConstraint::Grammar(g.to_owned())));
        }
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop().map(|f| f.1)),
            _ => Err(ApiError::invalid_request(
                format!(
                    "only one output constraint may be given, got {}",
                    found.iter().map(|f| f.0).collect::<Vec<_>>().join(" and ")
                ),
                Some(found[1].0),
            )),
        }
    }
}

fn schema_value(schema: &Value) -> Result<Value, ApiError> {
    let parsed = match schema {
        Value::String(text) => serde_json::from_str(text).map_err(|e| {
            ApiError::invalid_request(
                format!("guided_json is not valid JSON: {e}"),
                Some("guided_json"),
            )
        })?,
        other => other.clone(),
    };
    match parsed {
        Value::Object(_) | Value::Bool(true) => Ok(parsed),
        other => Err(ApiError::invalid_request(
            format!("guided_json must be a JSON Schema object, got {other}"),
            Some("guided_json"),
        )),
    }
}

fn parse_response_format(format: &Value) -> Result<Option<OutputConstraint>, ApiError> {
    let param = Some("response_format");
    let kind = format.get("type").and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid_request(
            format!("response_format must be an object with a string `type`, got {format}"),
            param,
        )
    })?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(OutputConstraint::JsonObject)),
        "json_schema" => {
            let spec = format.get("json_schema").ok_or_else(|| {
                ApiError::invalid_request(
                    "response_format of type json_schema needs a `json_schema` object with \
                     `name` and `schema`",
                    Some("response_format.json_schema"),
                )
            })?;
            let name_ok = spec
                .get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty() && n.len() <= 64);
            if !name_ok {
                return Err(ApiError::invalid_request(
                    "response_format.json_schema.name must be a string of 1 to 64 characters",
                    Some("response_format.json_schema.name"),
                ));
            }
            match spec.get("schema") {
                None | Some(Value::Null) => Ok(Some(OutputConstraint::JsonObject)),
                Some(s @ Value::Object(_)) => Ok(Some(OutputConstraint::JsonSchema(s.clone()))),
                Some(other) => Err(ApiError::invalid_request(
                    format!("response_format.json_schema.schema must be a JSON Schema object, got {other}"),
                    Some("response_format.json_schema.schema"),
                )),
            }
        }
        other => Err(ApiError::invalid_request(
            format!(
                "response_format.type must be \"text\", \"json_object\" or \"json_schema\", got \
                 {other:?}"
            ),
            Some("response_format.type"),
        )),
    }
}

/// Escapes `text` so a regular expression matches it literally.
pub fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~/\"".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn format(v: Value) -> Result<Option<OutputConstraint>, ApiError> {
        ConstraintFields {
            response_format: Some(&v),
            ..Default::default()
        }
        .parse()
    }

    #[test]
    fn response_formats() {
        assert_eq!(format(json!({"type": "text"})).expect("ok"), None);
        assert_eq!(
            format(json!({"type": "json_object"})).expect("ok"),
            Some(OutputConstraint::JsonObject)
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            format(json!({"type": "json_schema",
                "json_schema": {"name": "x", "schema": schema, "strict": true}}))
            .expect("ok"),
            Some(OutputConstraint::JsonSchema(schema))
        );
        for (bad, param) in [
            (json!({"type": "xml"}), "response_format.type"),
            (json!("json"), "response_format"),
            (
                json!({"type": "json_schema"}),
                "response_format.json_schema",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"schema": {}}}),
                "response_format.json_schema.name",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}),
                "response_format.json_schema.schema",
            ),
        ] {
            let err = format(bad).expect_err("invalid");
            assert_eq!(err.param.as_deref(), Some(param), "{}", err.message);
        }
    }

    #[test]
    fn guided_fields_and_conflicts() {
        let schema = json!("{\"type\": \"object\"}");
        let fields = ConstraintFields {
            guided_json: Some(&schema),
            ..Default::default()
        };
        assert_eq!(
            fields.parse().expect("ok"),
            Some(OutputConstraint::JsonSchema(json!({"type": "object"})))
        );
        let fmt = json!({"type": "json_object"});
        let err = ConstraintFields {
            response_format: Some(&fmt),
            guided_regex: Some("a+"),
            ..Default::default()
        }
        .parse()
        .expect_err("two constraints");
        assert!(
            err.message.contains("response_format and guided_regex"),
            "{}",
            err.message
        );
        let empty: Vec<String> = vec![];
        assert!(ConstraintFields {
            guided_choice: Some(&empty),
            ..Default::default()
        }
        .parse()
        .is_err());
    }

    #[test]
    fn escaping_is_literal() {
        assert_eq!(regex_escape("a.b(c)"), "a\\.b\\(c\\)");
    }
}
