use std::path::{Path, PathBuf};

use super::{Limit, MAX_BYTES, MAX_DEPTH, check};

/// Texts nesting `depth` levels, in every shape YAML nests: block mappings, block
/// sequences (one per line and several on one line), flow sequences and mappings, JSON,
/// and a mix.
fn nested(depth: usize) -> Vec<(&'static str, String)> {
    let mut block_map = String::new();
    let mut block_seq = String::new();
    for d in 0..depth {
        block_map.push_str(&"  ".repeat(d));
        block_map.push_str("a:\n");
        block_seq.push_str(&"  ".repeat(d));
        block_seq.push_str("-\n");
    }
    block_map.push_str(&"  ".repeat(depth));
    block_map.push_str("a: 1\n");
    block_seq.push_str(&"  ".repeat(depth));
    block_seq.push_str("- 1\n");
    let mixed_flow = format!(
        "a:\n  b: {}1{}\n",
        "[{x: ".repeat(depth / 2),
        "}]".repeat(depth / 2)
    );
    vec![
        ("block mappings", block_map),
        ("block sequences", block_seq),
        ("entries on one line", format!("{}1\n", "- ".repeat(depth))),
        (
            "flow sequences",
            format!("{}{}\n", "[".repeat(depth), "]".repeat(depth)),
        ),
        (
            "flow mappings",
            format!("{}1{}\n", "{a: ".repeat(depth), "}".repeat(depth)),
        ),
        (
            "JSON",
            format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth)),
        ),
        (
            "flow sequences over lines",
            "[\n".repeat(depth) + &"]\n".repeat(depth),
        ),
        ("flow in block", mixed_flow),
    ]
}

#[test]
fn hostile_nesting_is_refused_before_parsing() {
    for depth in [MAX_DEPTH + 2, 200, 700] {
        for (shape, text) in nested(depth) {
            assert!(text.len() < 1 << 20, "{shape}: keep the input bounded");
            assert!(
                matches!(check(&text), Err(Limit::TooDeep { .. })),
                "{shape} {depth} deep: {:?}",
                check(&text)
            );
        }
    }
}

#[test]
fn nesting_within_the_limit_is_read() {
    for (shape, text) in nested(MAX_DEPTH - 6) {
        assert_eq!(check(&text), Ok(()), "{shape}:\n{text}");
        // The shapes are YAML a parser reads.
        serde_yaml::from_str::<serde_yaml::Value>(&text)
            .unwrap_or_else(|e| panic!("{shape}: {e}\n{text}"));
    }
}

#[test]
fn the_error_names_the_line_and_the_limit() {
    let text = format!("services: []\n# fine\n{}\n", "[".repeat(100));
    let error = check(&text).unwrap_err();
    assert_eq!(error, Limit::TooDeep { line: 3 });
    assert!(
        error
            .to_string()
            .starts_with("line 3: nested deeper than the limit of 64 levels"),
        "{error}"
    );
}

#[test]
fn brackets_in_quotes_comments_and_block_scalars_do_not_nest() {
    let deep = "[{".repeat(100);
    for text in [
        format!("a: \"{deep}\"\n"),
        format!("a: '{deep}'\n"),
        format!("a: 'it''s {deep}'\n"),
        format!("a: \"escaped \\\" {deep}\"\n"),
        format!("a: \"over\n  two lines {deep}\"\nb: 1\n"),
        format!("# {deep}\na: 1 # {deep}\n"),
        format!("a: |\n  {deep}\n  {deep}\nb: >-\n  {deep}\n"),
        format!("- |\n  {deep}\n- b\n"),
        format!("a: x{deep}\n"),
        format!("a: plain text {deep}"),
    ] {
        assert_eq!(check(&text), Ok(()), "{text}");
    }
}

#[test]
fn a_file_over_the_size_limit_is_refused() {
    let text = format!("# {}\nservices: []\n", "x".repeat(MAX_BYTES));
    assert_eq!(check(&text), Err(Limit::TooLarge { bytes: text.len() }));
    assert!(check(&text).unwrap_err().to_string().contains("4194304"));
    assert_eq!(check(&format!("# {}", "x".repeat(MAX_BYTES - 2))), Ok(()));
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        {
            out.push(path);
        }
    }
}

/// The limits never refuse what the project itself ships or tests with.
#[test]
fn every_yaml_file_of_the_repository_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in ["examples", "deploy", "lb-core/tests/fixtures"] {
        yaml_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 20, "{files:?}");
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(check(&text), Ok(()), "{}", path.display());
    }
}
