//! The layering the code keeps, read from its own imports: which file of `src/` and `actors/src/`
//! uses which (every `use` tree expanded, and every `crate::`, `super::` and `uamt::` path in the
//! code). No two files import each other, directly or around a longer circle, and the lower layers
//! (`src/eval/`, `src/model/`, `src/data/`) never import the method (`src/method/`) or the
//! training step (`src/train.rs`). Unit tests (after `#[cfg(test)]`) and comments are not read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A crate's source folder.
struct Crate {
    src: PathBuf,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") && !p.ends_with("build.rs") {
            out.push(p);
        }
    }
}

/// The module path of `file` in its crate: `src/a/b.rs` and `src/a/b/mod.rs` are `[a, b]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// The file that defines the longest prefix of module path `parts` in the crate at `src`.
fn file_of(src: &Path, parts: &[String]) -> Option<PathBuf> {
    for k in (1..=parts.len()).rev() {
        let base = parts[..k].iter().fold(src.to_path_buf(), |p, s| p.join(s));
        for cand in [base.with_extension("rs"), base.join("mod.rs")] {
            if cand.is_file() {
                return Some(cand);
            }
        }
    }
    None
}

/// The code of `text` without comments and unit tests.
fn code(text: &str) -> String {
    let body = text.split("#[cfg(test)]").next().unwrap_or_default();
    body.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into its paths.
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else { return vec![tree] };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let (mut depth, mut start, mut items) = (0, 0, Vec::new());
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items.into_iter().filter(|s| !s.is_empty()).flat_map(expand).map(|s| format!("{prefix}{s}")).collect()
}

/// Every path `code` names: `use` trees expanded, plus paths written inline.
fn paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    // `use` statements: lines that start with one (after `pub`, `pub(crate)`, ...), up to `;`.
    let mut offset = 0;
    for line in code.split_inclusive('\n') {
        let t = line.trim_start();
        let t = t
            .strip_prefix("pub ")
            .or_else(|| t.strip_prefix("pub(crate) "))
            .or_else(|| t.strip_prefix("pub(super) "))
            .unwrap_or(t);
        if let Some(tree) = t.strip_prefix("use ") {
            let at = offset + line.len() - tree.len();
            if let Some(end) = code[at..].find(';') {
                out.extend(expand(&code[at..at + end]));
            }
        }
        offset += line.len();
    }
    for root in ["crate::", "super::", "uamt::"] {
        let mut rest = code;
        while let Some(i) = rest.find(root) {
            let before = rest[..i].chars().last();
            let tail: String =
                rest[i..].chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
            if before.is_none_or(|c| !c.is_alphanumeric() && c != '_' && c != ':') {
                out.push(tail.trim_end_matches(':').to_string());
            }
            rest = &rest[i + root.len()..];
        }
    }
    out
}

/// The import graph of both crates: file -> files it uses (paths relative to the repository).
fn graph(root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let core = Crate { src: root.join("src") };
    let actors = Crate { src: root.join("actors/src") };
    let rel = |p: &Path| p.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
    let mut edges = BTreeMap::new();
    for krate in [&core, &actors] {
        let mut files = Vec::new();
        rust_files(&krate.src, &mut files);
        for f in files {
            let module = module_of(&krate.src, &f);
            let text = std::fs::read_to_string(&f).unwrap();
            let mut deps = BTreeSet::new();
            for p in paths(&code(&text)) {
                let mut segs: Vec<String> = p.split("::").map(String::from).collect();
                let (src, mut base): (&Path, Vec<String>) = match segs.first().map(String::as_str) {
                    Some("crate") => (&krate.src, Vec::new()),
                    Some("uamt") => (&core.src, Vec::new()),
                    Some("self") => (&krate.src, module.clone()),
                    Some("super") => (&krate.src, module.clone()),
                    // A path relative to this module (`pub use child::Item`): only when a child
                    // module of that name exists (else it names another crate, `std`, `tch`, ...).
                    Some(first) => {
                        let child: Vec<String> = module.iter().cloned().chain([first.to_string()]).collect();
                        match file_of(&krate.src, &child) {
                            Some(t) if module_of(&krate.src, &t) == child => (&krate.src, module.clone()),
                            _ => continue,
                        }
                    }
                    None => continue,
                };
                while segs.first().map(String::as_str) == Some("super") {
                    base.pop();
                    segs.remove(0);
                }
                if matches!(segs.first().map(String::as_str), Some("crate" | "uamt" | "self")) {
                    segs.remove(0);
                }
                base.extend(segs);
                if let Some(t) = file_of(src, &base) {
                    if t != f {
                        deps.insert(rel(&t));
                    }
                }
            }
            edges.insert(rel(&f), deps);
        }
    }
    edges
}

/// A circle of imports, if there is one: the files around it.
fn find_circle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    // Depth-first search with colours: 1 = on the current path, 2 = done.
    fn visit(
        v: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        colour: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        colour.insert(v.to_string(), 1);
        path.push(v.to_string());
        for w in edges.get(v).into_iter().flatten() {
            match colour.get(w.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = path.iter().position(|p| p == w).unwrap();
                    return Some(path[start..].iter().cloned().chain([w.clone()]).collect());
                }
                0 => {
                    if let Some(c) = visit(w, edges, colour, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        colour.insert(v.to_string(), 2);
        None
    }
    let mut colour = BTreeMap::new();
    for v in edges.keys() {
        if colour.get(v.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(v, edges, &mut colour, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn use_trees_expand_and_paths_resolve() {
    assert_eq!(expand("crate::{a::B, c::{d, e::F}}"), vec!["crate::a::B", "crate::c::d", "crate::c::e::F"]);
    let p = paths("use super::x::{Y, z};\nfn f() { crate::a::b(); let s = \"my_use\"; }");
    assert!(p.contains(&"super::x::Y".to_string()) && p.contains(&"crate::a::b".to_string()), "{p:?}");
    let mut circle = BTreeMap::new();
    circle.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    circle.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(find_circle(&circle), Some(vec!["a".into(), "b".into(), "a".into()]));
    let g = graph(Path::new(env!("CARGO_MANIFEST_DIR")));
    // Known edges are found, through a `use` group, `super::` and the other crate.
    assert!(g["src/eval/predict.rs"].contains("src/data/preprocessing.rs"), "{:?}", g["src/eval/predict.rs"]);
    assert!(g["actors/src/cmd/predict.rs"].contains("src/fsutil/marker.rs"), "{:?}", g["actors/src/cmd/predict.rs"]);
    assert!(g["src/data/mod.rs"].contains("src/data/import_h5.rs"), "{:?}", g["src/data/mod.rs"]);
}

#[test]
fn no_file_imports_a_file_that_imports_it_back() {
    let g = graph(Path::new(env!("CARGO_MANIFEST_DIR")));
    if let Some(c) = find_circle(&g) {
        panic!("a circle of imports: {}", c.join(" -> "));
    }
}

#[test]
fn evaluation_models_and_data_know_nothing_of_the_method_or_the_training_step() {
    let g = graph(Path::new(env!("CARGO_MANIFEST_DIR")));
    let mut bad = Vec::new();
    for (file, deps) in &g {
        if ["src/eval/", "src/model/", "src/data/"].iter().any(|p| file.starts_with(p)) {
            for d in deps.iter().filter(|d| d.starts_with("src/method/") || *d == "src/train.rs") {
                bad.push(format!("{file} -> {d}"));
            }
        }
    }
    assert!(bad.is_empty(), "{bad:?}");
}

#[test]
fn libtorch_is_asked_about_cuda_only_through_the_cuda_module() {
    // libtorch's CUDA backend is loaded at run time (`uamt::device::cuda_backend`), and libtorch
    // settles on "no CUDA" for good the first time it is asked before that. So the questions
    // that come before a device is chosen (how many GPUs, is CUDA there) are asked in
    // `src/cuda.rs` alone, which loads the backend first; the rest of the code asks it
    // (`cuda_device_count`, `DeviceRequest::resolve`). Work on a chosen CUDA device
    // (`tch::Cuda::synchronize`, cuDNN settings) comes after the backend is loaded, and may stay.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let asks = ["Cuda::device_count", "Cuda::is_available", "cuda_if_available", "Cuda::cudnn_is_available"];
    let mut files = Vec::new();
    for dir in ["src", "actors/src", "tests", "actors/tests", "benches"] {
        rust_files(&root.join(dir), &mut files);
    }
    let mut bad = Vec::new();
    for f in &files {
        if f.ends_with("src/cuda.rs") || f.ends_with("tests/structure.rs") {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let line = line.split("//").next().unwrap_or_default();
            if asks.iter().any(|a| line.contains(a)) {
                bad.push(format!("{}:{}: {}", f.strip_prefix(root).unwrap().display(), i + 1, line.trim()));
            }
        }
    }
    assert!(bad.is_empty(), "ask uamt::device::cuda_device_count instead:\n{}", bad.join("\n"));
}
