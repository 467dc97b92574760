//! Property tests of the config layers: whatever a config file, a `--set` argument or an
//! `ALLCORES__` variable holds, loading it gives settings or one line naming the fault, and
//! never a panic or an allocation out of proportion to the input.

use std::collections::HashMap;
use std::io::Write;

use allcores_trainer::{Layers, Settings};
use proptest::prelude::*;

const CONFIG: &str = "[data]\nformat = \"csv\"\ntrain_csv = \"digits.csv\"\ntest_fraction = 0.2\n\
                      [model]\nhidden = [16, 8]\n[training]\nepochs = 2\nbatch_size = 8\n\
                      threads = 1\n[optimizer]\nlr = 0.001\n";

/// Loads `text` as a config file with the given layers.
fn load(text: &[u8], overrides: Vec<String>, environment: HashMap<String, String>) -> String {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(text).unwrap();
    let layers = Layers {
        overrides,
        environment: Some(environment),
    };
    match Settings::load(file.path(), &layers) {
        Ok(settings) => settings.to_toml(),
        Err(e) => {
            let message = e.to_string();
            assert!(e.is_bad_input(), "{message}");
            assert_eq!(message.lines().count(), 1, "not one line: {message}");
            message
        }
    }
}

/// Keys as users mistype them: known sections and names, dots, brackets with indices (the
/// ones config-rs grows a list up to), spaces and stray characters.
fn key() -> impl Strategy<Value = String> {
    let part = prop_oneof![
        Just("data".to_string()),
        Just("model".to_string()),
        Just("training".to_string()),
        Just("optimizer".to_string()),
        Just("hidden".to_string()),
        Just("batch_size".to_string()),
        Just("threads".to_string()),
        Just("lr".to_string()),
        "[a-z_]{0,8}",
        "[a-z]{1,6}\\[[0-9]{1,10}\\]",
        "[ .\\[\\]\\-a-z0-9]{0,6}",
    ];
    prop::collection::vec(part, 0..4).prop_map(|parts| parts.join("."))
}

/// Values: numbers at and past every limit, lists, strings, and TOML that does not parse.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        any::<u64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| v.to_string()),
        prop::collection::vec(any::<i32>(), 0..5).prop_map(|v| format!("{v:?}")),
        Just("[18446744073709551615, 1]".to_string()),
        Just("auto".to_string()),
        "\\PC{0,12}",
        "[\\[\\]{}\"'=,.0-9a-z ]{0,16}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_set_argument_loads_or_is_refused_on_one_line(
        sets in prop::collection::vec((key(), value()), 1..4),
        bare in "\\PC{0,20}",
    ) {
        let mut overrides: Vec<String> =
            sets.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        overrides.push(bare);
        load(CONFIG.as_bytes(), overrides, HashMap::new());
    }

    #[test]
    fn any_environment_variable_loads_or_is_refused_on_one_line(
        variables in prop::collection::vec((key(), value()), 1..4),
    ) {
        let environment = variables
            .into_iter()
            .map(|(k, v)| (format!("ALLCORES__{}", k.to_uppercase().replace('.', "__")), v))
            .collect();
        load(CONFIG.as_bytes(), Vec::new(), environment);
    }

    /// A valid config with bytes replaced, inserted or cut off.
    #[test]
    fn any_mutated_config_file_loads_or_is_refused_on_one_line(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..8),
    ) {
        let mut text = CONFIG.as_bytes().to_vec();
        for (at, byte, kind) in edits {
            let i = at.index(text.len().max(1)).min(text.len());
            match kind {
                0 if i < text.len() => text[i] = byte,
                1 => text.insert(i, byte),
                _ => text.truncate(i),
            }
        }
        load(&text, Vec::new(), HashMap::new());
    }
}
