//! `/v1/models`: the list of served models.

use serde::{Deserialize, Serialize};

/// The body of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelList {
    /// Always `"list"`.
    pub object: String,
    /// The served models.
    pub data: Vec<ModelCard>,
}

impl ModelList {
    /// A list of the given models.
    pub fn new(data: Vec<ModelCard>) -> Self {
        Self {
            object: "list".to_owned(),
            data,
        }
    }
}

/// One served model; also the body of `GET /v1/models/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCard {
    /// The name clients pass as `model`.
    pub id: String,
    /// Always `"model"`.
    pub object: String,
    /// Unix timestamp (seconds) the model was loaded or published.
    pub created: u64,
    /// Owner shown to clients.
    pub owned_by: String,
    /// Extension: context window in tokens, omitted when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<u32>,
}

impl ModelCard {
    /// A card without a context length.
    pub fn new(id: impl Into<String>, created: u64, owned_by: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            object: "model".to_owned(),
            created,
            owned_by: owned_by.into(),
            max_model_len: None,
        }
    }

    /// The same card with `max_model_len` set.
    pub fn with_max_model_len(mut self, max_model_len: u32) -> Self {
        self.max_model_len = Some(max_model_len);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wire_format() {
        let list = ModelList::new(vec![
            ModelCard::new("llama", 100, "lastmile").with_max_model_len(8192),
            ModelCard::new("qwen", 200, "lastmile"),
        ]);
        let v = serde_json::to_value(&list).expect("ser");
        assert_eq!(
            v,
            json!({"object": "list", "data": [
                {"id": "llama", "object": "model", "created": 100, "owned_by": "lastmile",
                 "max_model_len": 8192},
                {"id": "qwen", "object": "model", "created": 200, "owned_by": "lastmile"}
            ]})
        );
        let back: ModelList = serde_json::from_value(v).expect("de");
        assert_eq!(back, list);
    }

    #[test]
    fn parses_openai_listing() {
        let v = json!({"object": "list", "data": [
            {"id": "gpt-4o", "object": "model", "created": 1715367049, "owned_by": "system"}
        ]});
        let list: ModelList = serde_json::from_value(v).expect("de");
        assert_eq!(list.data[0].id, "gpt-4o");
        assert_eq!(list.data[0].max_model_len, None);
    }
}
