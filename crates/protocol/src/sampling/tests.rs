use super::*;
use serde_json::json;

fn fields() -> SamplingFields<'static> {
    SamplingFields {
        max_tokens_param: "max_tokens",
        ..SamplingFields::default()
    }
}

fn assert_rejects(f: SamplingFields<'_>, param: &str, needles: &[&str]) {
    let err = f.validate().expect_err("should be rejected");
    assert_eq!(err.status, 400);
    assert_eq!(err.param.as_deref(), Some(param), "{}", err.message);
    for needle in needles {
        assert!(
            err.message.contains(needle),
            "{:?} lacks {needle:?}",
            err.message
        );
    }
}

#[test]
fn stop_from_string_and_array() {
    let one: StopSequences = serde_json::from_value(json!("\n")).expect("string");
    assert_eq!(one, StopSequences::One("\n".into()));
    assert_eq!(one.as_slice(), ["\n".to_string()]);
    let many: StopSequences = serde_json::from_value(json!(["a", "b"])).expect("array");
    assert_eq!(many.as_slice(), ["a".to_string(), "b".to_string()]);
    assert_eq!(serde_json::to_value(&one).expect("ser"), json!("\n"));
    assert_eq!(serde_json::to_value(&many).expect("ser"), json!(["a", "b"]));
    let err = serde_json::from_value::<StopSequences>(json!(3)).expect_err("number");
    assert!(
        err.to_string().contains("a string or an array of strings"),
        "{err}"
    );
    assert!(serde_json::from_value::<StopSequences>(json!([1])).is_err());
}

#[test]
fn stop_limits() {
    let ok = StopSequences::Many(vec!["x".into(); MAX_STOP_SEQUENCES]);
    assert!(ok.validate().is_ok());
    let too_many = StopSequences::Many(vec!["x".into(); MAX_STOP_SEQUENCES + 1]);
    let err = too_many.validate().expect_err("17 stops");
    assert_eq!(err.param.as_deref(), Some("stop"));
    assert!(err.message.contains("at most 16") && err.message.contains("got 17"));
    let err = StopSequences::One(String::new())
        .validate()
        .expect_err("empty");
    assert_eq!(err.param.as_deref(), Some("stop"));
    assert!(StopSequences::One("x".repeat(MAX_STOP_BYTES))
        .validate()
        .is_ok());
    let err = StopSequences::Many(vec!["x".into(), "x".repeat(MAX_STOP_BYTES + 1)])
        .validate()
        .expect_err("too long");
    assert_eq!(err.param.as_deref(), Some("stop"));
    assert!(err.message.contains("at most 512 bytes"), "{}", err.message);
}

#[test]
fn logit_bias_is_capped_at_300_entries() {
    let map = |n: usize| -> Map<String, Value> {
        (0..n).map(|i| (i.to_string(), Value::from(1))).collect()
    };
    let ok = map(MAX_LOGIT_BIAS);
    let fields = SamplingFields {
        logit_bias: Some(&ok),
        ..SamplingFields::default()
    };
    assert!(fields.validate().is_ok());
    let too_many = map(MAX_LOGIT_BIAS + 1);
    let fields = SamplingFields {
        logit_bias: Some(&too_many),
        ..SamplingFields::default()
    };
    let err = fields.validate().expect_err("301 entries");
    assert_eq!(err.param.as_deref(), Some("logit_bias"));
    assert!(err.message.contains("at most 300"), "{}", err.message);
}

#[test]
fn usage_and_finish_reason_wire_format() {
    let u = Usage::new(3, 4);
    assert_eq!(
        serde_json::to_value(u).expect("ser"),
        json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
    );
    let back: Usage = serde_json::from_value(json!(
        {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    ))
    .expect("de");
    assert_eq!(back, u);
    for (reason, text) in [
        (FinishReason::Stop, "stop"),
        (FinishReason::Length, "length"),
        (FinishReason::ToolCalls, "tool_calls"),
        (FinishReason::ContentFilter, "content_filter"),
    ] {
        assert_eq!(serde_json::to_value(reason).expect("ser"), json!(text));
        let back: FinishReason = serde_json::from_value(json!(text)).expect("de");
        assert_eq!(back, reason);
    }
}

#[test]
fn stream_options_default() {
    let o: StreamOptions = serde_json::from_value(json!({})).expect("de");
    assert!(!o.include_usage);
    let o: StreamOptions = serde_json::from_value(json!({"include_usage": true})).expect("de");
    assert!(o.include_usage);
}

#[test]
fn defaults_validate_and_convert() {
    let f = fields();
    assert!(f.validate().is_ok());
    assert_eq!(f.to_request(), SamplingRequest::default());
}

#[test]
fn boundaries_accepted() {
    let stop = StopSequences::One("###".into());
    let f = SamplingFields {
        temperature: Some(0.0),
        top_p: Some(1.0),
        top_k: Some(-1),
        min_p: Some(1.0),
        presence_penalty: Some(-2.0),
        frequency_penalty: Some(2.0),
        repetition_penalty: Some(10.0),
        n: Some(1),
        seed: Some(7),
        max_tokens: Some(1),
        stop: Some(&stop),
        ignore_eos: true,
        ..fields()
    };
    assert!(f.validate().is_ok());
    let r = f.to_request();
    assert_eq!(r.temperature, 0.0);
    assert_eq!(r.top_k, 0);
    assert_eq!(r.repetition_penalty, 10.0);
    assert_eq!(r.seed, Some(7));
    assert_eq!(r.max_tokens, Some(1));
    assert_eq!(r.stop, vec!["###".to_string()]);
    assert!(r.ignore_eos);
    let big_k = SamplingFields {
        top_k: Some(i64::MAX),
        ..fields()
    };
    assert_eq!(big_k.to_request().top_k, u32::MAX);
    let k = SamplingFields {
        top_k: Some(40),
        ..fields()
    };
    assert_eq!(k.to_request().top_k, 40);
}

#[test]
fn every_range_error_names_param_range_and_value() {
    assert_rejects(
        SamplingFields {
            temperature: Some(3.5),
            ..fields()
        },
        "temperature",
        &["temperature must be between 0 and 2, got 3.5"],
    );
    assert_rejects(
        SamplingFields {
            temperature: Some(-0.1),
            ..fields()
        },
        "temperature",
        &["got -0.1"],
    );
    assert_rejects(
        SamplingFields {
            top_p: Some(0.0),
            ..fields()
        },
        "top_p",
        &["top_p must be greater than 0 and at most 1, got 0"],
    );
    assert_rejects(
        SamplingFields {
            top_p: Some(1.5),
            ..fields()
        },
        "top_p",
        &["got 1.5"],
    );
    assert_rejects(
        SamplingFields {
            top_k: Some(-2),
            ..fields()
        },
        "top_k",
        &["top_k", "-1", "at least 1", "got -2"],
    );
    assert_rejects(
        SamplingFields {
            min_p: Some(1.01),
            ..fields()
        },
        "min_p",
        &["min_p must be between 0 and 1, got 1.01"],
    );
    assert_rejects(
        SamplingFields {
            presence_penalty: Some(-2.5),
            ..fields()
        },
        "presence_penalty",
        &["between -2 and 2, got -2.5"],
    );
    assert_rejects(
        SamplingFields {
            frequency_penalty: Some(2.1),
            ..fields()
        },
        "frequency_penalty",
        &["between -2 and 2, got 2.1"],
    );
    assert_rejects(
        SamplingFields {
            repetition_penalty: Some(0.0),
            ..fields()
        },
        "repetition_penalty",
        &["greater than 0 and at most 10, got 0"],
    );
    assert_rejects(
        SamplingFields {
            repetition_penalty: Some(11.0),
            ..fields()
        },
        "repetition_penalty",
        &["got 11"],
    );
    assert_rejects(
        SamplingFields {
            max_tokens: Some(0),
            ..fields()
        },
        "max_tokens",
        &["max_tokens must be at least 1, got 0"],
    );
    assert_rejects(
        SamplingFields {
            max_tokens: Some(0),
            max_tokens_param: "max_completion_tokens",
            ..fields()
        },
        "max_completion_tokens",
        &["max_completion_tokens must be at least 1"],
    );
    assert_rejects(
        SamplingFields {
            n: Some(0),
            ..fields()
        },
        "n",
        &["n must be between 1 and 16, got 0"],
    );
    assert_rejects(
        SamplingFields {
            n: Some(17),
            ..fields()
        },
        "n",
        &["between 1 and 16", "17"],
    );
    for (bias, needle) in [
        (json!({"abc": 1}), "token ids"),
        (json!({"5": 101}), "between -100 and 100"),
        (json!({"5": "x"}), "between -100 and 100"),
    ] {
        let map = bias.as_object().cloned().expect("object");
        assert_rejects(
            SamplingFields {
                logit_bias: Some(&map),
                ..fields()
            },
            "logit_bias",
            &[needle],
        );
    }
}

#[test]
fn logit_bias_and_n_convert() {
    let map = json!({"7": -100, " 3": 2.5})
        .as_object()
        .cloned()
        .expect("object");
    let req = SamplingFields {
        logit_bias: Some(&map),
        n: Some(3),
        ..fields()
    }
    .to_request();
    assert_eq!(req.logit_bias, vec![(3, 2.5), (7, -100.0)]);
    assert_eq!(req.n, 3);
}

#[test]
fn non_finite_values_rejected() {
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        assert_rejects(
            SamplingFields {
                temperature: Some(bad),
                ..fields()
            },
            "temperature",
            &[],
        );
        assert_rejects(
            SamplingFields {
                top_p: Some(bad),
                ..fields()
            },
            "top_p",
            &[],
        );
        assert_rejects(
            SamplingFields {
                repetition_penalty: Some(bad),
                ..fields()
            },
            "repetition_penalty",
            &[],
        );
    }
}

#[derive(Deserialize)]
struct SeedHolder {
    #[serde(default, deserialize_with = "deserialize_seed")]
    seed: Option<u64>,
}

#[test]
fn seed_accepts_any_integer() {
    let parse = |v: serde_json::Value| serde_json::from_value::<SeedHolder>(v).map(|h| h.seed);
    assert_eq!(parse(json!({})).expect("absent"), None);
    assert_eq!(parse(json!({"seed": null})).expect("null"), None);
    assert_eq!(parse(json!({"seed": 42})).expect("pos"), Some(42));
    assert_eq!(
        parse(json!({"seed": u64::MAX})).expect("u64"),
        Some(u64::MAX)
    );
    assert_eq!(parse(json!({"seed": -1})).expect("neg"), Some(u64::MAX));
    assert!(parse(json!({"seed": 1.5})).is_err());
    assert!(parse(json!({"seed": "7"})).is_err());
}

#[test]
fn usage_field_three_states() {
    #[derive(Serialize, Deserialize)]
    struct Holder {
        #[serde(default, skip_serializing_if = "UsageField::is_omitted")]
        usage: UsageField,
    }
    let ser = |u| serde_json::to_value(Holder { usage: u }).expect("ser");
    assert_eq!(ser(UsageField::Omitted), json!({}));
    assert_eq!(ser(UsageField::Null), json!({"usage": null}));
    assert_eq!(
        ser(UsageField::Reported(Usage::new(1, 2)))["usage"]["total_tokens"],
        json!(3)
    );
    let de = |v| serde_json::from_value::<Holder>(v).expect("de").usage;
    assert_eq!(de(json!({})), UsageField::Omitted);
    assert_eq!(de(json!({"usage": null})), UsageField::Null);
    assert_eq!(
        de(json!({"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})),
        UsageField::Reported(Usage::new(1, 2))
    );
    assert_eq!(
        UsageField::Reported(Usage::new(1, 2)).usage(),
        Some(&Usage::new(1, 2))
    );
    assert_eq!(UsageField::Null.usage(), None);
}
