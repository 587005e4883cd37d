//! The library's layering, checked from the source: each top-level module
//! may use only the modules below it in `LAYERS` (the table in `lib.rs`),
//! and no two files import each other, directly or in a circle.
//!
//! An import is any path through `crate::`, `super::` or `self::`, or
//! through a child module a file declares (`mod x;` … `x::y`), in code;
//! comments and string contents are skipped, and so are unit tests
//! (`#[cfg(test)]` items and `tests.rs` files), which may use whatever helps
//! them test. The crate root only declares modules and re-exports the
//! spec's error type, so paths that end at the root are not edges.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules, highest first (as in `lib.rs`).
const LAYERS: &[&str] = &[
    "cli",
    "serve",
    "ops",
    "config",
    "client",
    "api",
    "lockdown",
    "audit",
    "net",
    "state",
    "guard",
    "hsm",
    "telemetry",
    "spec",
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The library's files with their module paths (`api/pipeline.rs` →
/// `["api", "pipeline"]`; `api/mod.rs` → `["api"]`).
fn library_files() -> Vec<(Vec<String>, PathBuf)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let root = src();
    let mut files = Vec::new();
    walk(&root, &mut files);
    files
        .into_iter()
        .filter_map(|p| {
            let rel = p.strip_prefix(&root).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            // The binaries are not the library; unit-test files are exempt.
            if parts[0] == "main" || parts[0] == "bin" || parts.last().unwrap() == "tests" {
                return None;
            }
            if parts == ["lib"] {
                parts.clear();
            } else if parts.last().unwrap() == "mod" {
                parts.pop();
            }
            Some((parts, p))
        })
        .collect()
}

/// The code of a file: comments, string and char literals, and the unit
/// tests (`#[cfg(test)]` or `#[cfg(all(test, …))]` items) removed.
fn code(text: &str) -> String {
    without_test_items(&without_literals(text))
}

/// Blanks comments (line and block), string literals (raw ones too) and
/// char literals, keeping line breaks and everything else.
fn without_literals(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("/*") {
            let mut depth = 0;
            while i < b.len() {
                if text[i..].starts_with("/*") {
                    depth += 1;
                    i += 2;
                } else if text[i..].starts_with("*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if (rest.starts_with("r\"") || rest.starts_with("r#"))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            let hashes = rest[1..].bytes().take_while(|&c| c == b'#').count();
            if rest[1 + hashes..].starts_with('"') {
                let close = format!("\"{}", "#".repeat(hashes));
                let body = i + 2 + hashes;
                i = body
                    + text[body..]
                        .find(&close)
                        .map_or(text.len() - body, |e| e + close.len());
                out.push_str("\"\"");
            } else {
                out.push('r');
                i += 1;
            }
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\'', '\u{..}'), or a lifetime.
            let lit = if rest[1..].starts_with('\\') {
                rest[2..].find('\'').map(|e| e + 3)
            } else {
                rest[1..]
                    .char_indices()
                    .nth(1)
                    .filter(|(_, c)| *c == '\'')
                    .map(|(e, _)| e + 2)
            };
            match lit {
                Some(len) => {
                    i += len;
                    out.push_str("' '");
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Removes each item marked `#[cfg(test)]` or `#[cfg(all(test, …))]`: a
/// `mod x;` declaration or a whole `{ … }` item.
fn without_test_items(code: &str) -> String {
    let mut out = code.to_string();
    while let Some(at) = ["#[cfg(test)]", "#[cfg(all(test"]
        .iter()
        .filter_map(|m| out.find(m))
        .min()
    {
        let b = out.as_bytes();
        let semi = out[at..].find(';').map(|e| at + e);
        let brace = out[at..].find('{').map(|e| at + e);
        let end = match (semi, brace) {
            (Some(s), Some(o)) if s < o => s + 1,
            (Some(s), None) => s + 1,
            (_, Some(open)) => {
                let mut depth = 0;
                let mut j = open;
                while j < b.len() {
                    match b[j] {
                        b'{' => depth += 1,
                        b'}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                (j + 1).min(b.len())
            }
            (None, None) => out.len(),
        };
        out.replace_range(at..end, "");
    }
    out
}

/// Expands a use tree starting at `s` (after a `::`) into paths.
fn tree(s: &str) -> (Vec<Vec<String>>, usize) {
    let bytes = s.as_bytes();
    let ident_end = |from: usize| {
        let mut i = from;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            i += 1;
        }
        i
    };
    let skip_ws = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let mut i = skip_ws(0);
    if i < bytes.len() && bytes[i] == b'{' {
        let mut all = Vec::new();
        i += 1;
        loop {
            i = skip_ws(i);
            if i >= bytes.len() {
                return (all, i);
            }
            if bytes[i] == b'}' {
                return (all, i + 1);
            }
            if bytes[i] == b',' {
                i += 1;
                continue;
            }
            let (paths, used) = tree(&s[i..]);
            if used == 0 {
                i += 1;
                continue;
            }
            all.extend(paths);
            i += used;
        }
    }
    if i < bytes.len() && bytes[i] == b'*' {
        return (vec![vec!["*".to_string()]], i + 1);
    }
    let end = ident_end(i);
    if end == i {
        return (vec![vec![]], i);
    }
    let name = s[i..end].to_string();
    let after = skip_ws(end);
    if s[after..].starts_with("::") {
        let (rest, used) = tree(&s[after + 2..]);
        let paths = rest
            .into_iter()
            .map(|mut p| {
                p.insert(0, name.clone());
                p
            })
            .collect();
        return (paths, after + 2 + used);
    }
    (vec![vec![name]], end)
}

/// The module paths a file's code names, before resolution: each is
/// (how many levels up it starts, the path).
fn references(code: &str, children: &BTreeSet<String>) -> Vec<(Option<usize>, Vec<String>)> {
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let boundary = i == 0 || {
            let p = bytes[i - 1];
            !(p.is_ascii_alphanumeric() || p == b'_' || p == b':' || p == b'$')
        };
        if !boundary || !(bytes[i].is_ascii_alphabetic() || bytes[i] == b'_') {
            i += 1;
            continue;
        }
        let (paths, used) = tree(&code[i..]);
        for mut p in paths {
            // A glob names the module it reads from.
            if p.last().is_some_and(|l| l == "*") {
                p.pop();
            } else if p.len() < 2 {
                // A lone name, `pub(super)`, `crate` alone: not an import.
                continue;
            }
            let Some(first) = p.first() else { continue };
            let start = match first.as_str() {
                "crate" => Some((None, &p[1..])),
                "self" => Some((Some(0), &p[1..])),
                "super" => {
                    let ups = p.iter().take_while(|s| *s == "super").count();
                    Some((Some(ups), &p[ups..]))
                }
                name if children.contains(name) && p.len() >= 2 => Some((Some(0), &p[..])),
                _ => None,
            };
            if let Some((up, rest)) = start {
                out.push((up, rest.to_vec()));
            }
        }
        i += used.max(1);
    }
    out
}

/// The child modules a file declares.
fn declared_children(code: &str) -> BTreeSet<String> {
    code.lines()
        .filter_map(|l| {
            let mut l = l.trim();
            // Attributes on the same line, then any visibility.
            while l.starts_with("#[") {
                l = l[l.find(']')? + 1..].trim_start();
            }
            if l.starts_with("pub(") {
                l = l[l.find(')')? + 1..].trim_start();
            }
            let l = l.strip_prefix("pub ").unwrap_or(l);
            l.strip_prefix("mod ")?
                .strip_suffix(';')
                .map(|n| n.trim().to_string())
        })
        .collect()
}

/// The deepest module file a path reaches.
fn resolve(
    files: &BTreeMap<Vec<String>, PathBuf>,
    base: &[String],
    path: &[String],
) -> Option<Vec<String>> {
    let mut module = base.to_vec();
    let mut found = files.contains_key(&module).then(|| module.clone());
    for seg in path {
        module.push(seg.clone());
        if files.contains_key(&module) {
            found = Some(module.clone());
        } else {
            break;
        }
    }
    found
}

/// Each file's imports of other library files.
fn imports() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let files: BTreeMap<Vec<String>, PathBuf> = library_files().into_iter().collect();
    let mut graph = BTreeMap::new();
    for (module, path) in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let code = code(&text);
        let children = declared_children(&code);
        let is_mod_file = path.ends_with("mod.rs") || path.ends_with("lib.rs");
        // `self` and a declared child are relative to this module; `super`
        // to its parent (for `x.rs`, the directory's module).
        let mut edges = BTreeSet::new();
        for (up, rest) in references(&code, &children) {
            let base: Vec<String> = match up {
                None => vec![],
                Some(0) => module.clone(),
                Some(n) => {
                    let keep = module.len().saturating_sub(n);
                    module[..keep].to_vec()
                }
            };
            let rest: Vec<String> = rest.into_iter().collect();
            if let Some(target) = resolve(&files, &base, &rest) {
                if &target != module && !(is_mod_file && target.is_empty()) {
                    edges.insert(target);
                }
            }
        }
        graph.insert(module.clone(), edges);
    }
    graph
}

fn name(m: &[String]) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

#[test]
fn the_layer_table_names_every_top_level_module() {
    let tops: BTreeSet<String> = library_files()
        .into_iter()
        .filter_map(|(m, _)| m.first().cloned())
        .collect();
    let listed: BTreeSet<String> = LAYERS.iter().map(|s| s.to_string()).collect();
    assert_eq!(tops, listed, "update LAYERS here and the table in lib.rs");
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    for layer in LAYERS {
        assert!(
            lib.contains(&format!("| [`{layer}`] |")),
            "lib.rs's module map does not list `{layer}`"
        );
    }
}

#[test]
fn imports_point_down_the_layers() {
    let rank = |m: &[String]| m.first().and_then(|t| LAYERS.iter().position(|l| l == t));
    let mut up = Vec::new();
    let graph = imports();
    for (from, targets) in &graph {
        for to in targets {
            if let (Some(a), Some(b)) = (rank(from), rank(to)) {
                if a > b {
                    up.push(format!("{} → {}", name(from), name(to)));
                }
            }
        }
    }
    // The checker itself must see the imports it is meant to judge.
    let api = graph.get(&vec!["api".to_string(), "pipeline".to_string()]);
    assert!(
        api.is_some_and(|t| t.contains(&vec!["guard".to_string(), "sigv4".to_string()])),
        "the import scan missed api::pipeline → guard::sigv4: {api:?}"
    );
    assert!(up.is_empty(), "imports that point up:\n{}", up.join("\n"));
}

#[test]
fn no_files_import_each_other_in_a_circle() {
    let graph = imports();
    // Tarjan's strongly connected components.
    struct Tarjan<'g> {
        graph: &'g BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<&'g Vec<String>, (usize, usize)>,
        stack: Vec<&'g Vec<String>>,
        on_stack: BTreeSet<&'g Vec<String>>,
        next: usize,
        circles: Vec<Vec<String>>,
    }
    impl<'g> Tarjan<'g> {
        fn visit(&mut self, v: &'g Vec<String>) {
            self.index.insert(v, (self.next, self.next));
            self.next += 1;
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.index[w].1.min(self.index[v].1);
                    self.index.get_mut(v).unwrap().1 = low;
                } else if self.on_stack.contains(w) {
                    let low = self.index[w].0.min(self.index[v].1);
                    self.index.get_mut(v).unwrap().1 = low;
                }
            }
            if self.index[v].0 == self.index[v].1 {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(name(w));
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.circles.push(component);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph: &graph,
        index: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        circles: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    // Name the imports that close each circle.
    let edges: Vec<String> = t
        .circles
        .iter()
        .flat_map(|c| {
            let graph = &graph;
            c.iter().flat_map(move |from| {
                graph
                    .iter()
                    .filter(move |(m, _)| name(m) == *from)
                    .flat_map(|(_, targets)| targets.iter().map(|t| name(t)))
                    .filter(|to| c.contains(to))
                    .map(move |to| format!("{from} → {to}"))
            })
        })
        .collect();
    assert!(
        t.circles.is_empty(),
        "files that import each other: {:?}\n{}",
        t.circles,
        edges.join("\n")
    );
}
