//! The pipeline loader (YAML, `${VAR}` expansion, validation, SQL parsing) on arbitrary text: it returns
//! a pipeline or a list of issues, never panics.
#![no_main]

use std::{collections::BTreeMap, path::Path};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Variables resolve to a value, so that expansion and the spec behind it are both explored.
    let lookup = |name: &str| (name.len() % 3 != 0).then(|| format!("v_{name}"));
    let file = Path::new("/nonexistent/medallion-fuzz/pipelines/p.yaml");
    let vars = BTreeMap::from([("date".to_string(), "2020-01-01".to_string())]);
    if let Err(error) = medallion::config::load_text(file, text, lookup, &vars) {
        // Error text is built from the input: formatting it must not panic either.
        let _ = error.to_string();
    }
});
