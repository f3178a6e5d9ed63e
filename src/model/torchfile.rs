//! PyTorch's own weights files, read without PyTorch: what `torch.save(model.state_dict(), f)`
//! writes (and `uamt export --out F.pt`, see [`torchsave`](super::torchsave)), TorchScript
//! archives (`torch.jit.script(model).save(f)`, `torch.jit.trace(...).save(f)`) and tch's `.ot`
//! files (a TorchScript archive of named tensors, `.` written `|`).
//!
//! All are zip archives under one folder `<p>/`: `<p>/data.pkl` a pickle, `<p>/data/<key>` one
//! raw little-endian record per storage, `<p>/byteorder`; a TorchScript archive also holds
//! `<p>/constants.pkl` and `<p>/code/`. The pickle is read by the restricted unpickler
//! ([`pickle`](super::pickle)): a `state_dict` is an `OrderedDict` of tensors; a TorchScript
//! module is an object of a `__torch__` class whose state holds its parameters, buffers and
//! submodules, named here as `state_dict()` names them (`block_one.conv.0.weight`). Every storage
//! key, kind and record length, and every tensor's size, stride and offset, is checked against
//! the bytes before a tensor is made.

use super::pickle::{self, Node, Object, Options, Storage, TensorRef, Value};
use super::tensorfile::{RawTensor, MAX_FILE_BYTES};
use std::collections::{HashMap, HashSet};
use std::io::{Cursor, Read};
use std::rc::Rc;

/// The largest `data.pkl` taken (a V-Net's is about 30 KB as a state dict, 60 KB as TorchScript).
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// Named raw tensors, or why a file is refused.
type Parsed = std::result::Result<Vec<(String, RawTensor)>, String>;

/// The two kinds of PyTorch archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    /// `torch.save` of a dictionary of tensors.
    StateDict,
    /// A TorchScript module (scripted, traced, or tch's `.ot`).
    TorchScript,
}

/// The folder `<p>` of an archive's `<p>/data.pkl` and the archive's kind, or `None` when the
/// names are not those of a PyTorch archive.
pub fn archive_layout(names: &[&str]) -> Option<(String, ArchiveKind)> {
    let prefix = names.iter().find_map(|n| {
        let (p, rest) = n.split_once('/')?;
        (rest == "data.pkl" && !p.is_empty()).then(|| p.to_string())
    })?;
    let script = names.iter().any(|n| {
        n.strip_prefix(prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .is_some_and(|r| r == "constants.pkl" || r.starts_with("code/"))
    });
    Some((prefix, if script { ArchiveKind::TorchScript } else { ArchiveKind::StateDict }))
}

/// Whether the zip archive `bytes` is laid out as a PyTorch archive (see [`archive_layout`]), or
/// why it cannot be read as a zip archive at all.
pub fn is_torch_zip(bytes: &[u8]) -> std::result::Result<bool, String> {
    std::panic::catch_unwind(|| {
        zip::ZipArchive::new(Cursor::new(bytes))
            .map(|z| archive_layout(&z.file_names().collect::<Vec<_>>()).is_some())
            .map_err(|e| format!("a zip archive that cannot be read (truncated?): {e}"))
    })
    .unwrap_or_else(|_| Err("a zip archive that cannot be read (the zip reader failed on it)".into()))
}

/// Whether `bytes` are a zip archive laid out as a PyTorch archive.
pub fn is_torch_archive(bytes: &[u8]) -> bool {
    is_torch_zip(bytes).unwrap_or(false)
}

/// Parses a PyTorch archive into named tensors; any panic inside the zip reader is an error.
pub fn parse(bytes: &[u8]) -> Parsed {
    std::panic::catch_unwind(|| parse_archive(bytes))
        .unwrap_or_else(|_| Err("not a readable PyTorch archive (the zip reader failed on it)".to_string()))
}

/// Reads the whole entry `name`, at most `limit` bytes; `budget` is what may still be
/// decompressed in all.
fn read_entry(
    zip: &mut zip::ZipArchive<Cursor<&[u8]>>,
    name: &str,
    limit: u64,
    budget: &mut u64,
) -> std::result::Result<Vec<u8>, String> {
    let mut entry = zip.by_name(name).map_err(|e| format!("`{name}`: {e}"))?;
    let cap = limit.min(*budget);
    let mut content = Vec::new();
    (&mut entry).take(cap + 1).read_to_end(&mut content).map_err(|e| format!("`{name}`: {e} (truncated?)"))?;
    if content.len() as u64 > cap {
        return Err(format!("`{name}` holds more than {cap} bytes (limit)"));
    }
    *budget -= content.len() as u64;
    Ok(content)
}

fn parse_archive(bytes: &[u8]) -> Parsed {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| format!("not a readable zip archive: {e}"))?;
    let names: Vec<String> = zip.file_names().map(String::from).collect();
    let (prefix, kind) = archive_layout(&names.iter().map(String::as_str).collect::<Vec<_>>()).ok_or_else(|| {
        if names.iter().any(|n| n.ends_with("attributes.pkl") || n == "model.json" || n.ends_with("/model.json")) {
            "a TorchScript archive in the format of PyTorch before 1.4 (no data.pkl): load it in PyTorch \
             and save it again"
                .to_string()
        } else {
            "a zip archive without `<folder>/data.pkl`: not a PyTorch file".to_string()
        }
    })?;
    let mut budget = MAX_FILE_BYTES;
    let order = format!("{prefix}/byteorder");
    if names.contains(&order) {
        let b = read_entry(&mut zip, &order, 16, &mut budget)?;
        if b.as_slice() != b"little" {
            return Err(format!("byte order `{}` (only little-endian files are read)", String::from_utf8_lossy(&b)));
        }
    }
    let pkl = read_entry(&mut zip, &format!("{prefix}/data.pkl"), MAX_PICKLE_BYTES, &mut budget)?;
    let mut storages: HashMap<String, Rc<Storage>> = HashMap::new();
    let mut load = |pid: &Value| -> std::result::Result<Value, String> {
        let (kind, key, numel) = storage_id(pid)?;
        if let Some(s) = storages.get(&key) {
            if s.kind != kind || s.numel != numel {
                return Err(format!(
                    "storage `{key}` is named as {numel} {kind:?} elements and as {} {:?} elements",
                    s.numel, s.kind
                ));
            }
            return Ok(Value::Storage(s.clone()));
        }
        let record = format!("{prefix}/data/{key}");
        let need = numel.checked_mul(kind.elt_size_in_bytes()).filter(|&b| b as u64 <= MAX_FILE_BYTES);
        let need = need.ok_or_else(|| format!("storage `{key}` of {numel} elements is too large"))?;
        let data = read_entry(&mut zip, &record, need as u64, &mut budget)?;
        if data.len() != need {
            return Err(format!(
                "storage `{key}` ({record}) holds {} bytes, {numel} {kind:?} elements need {need} (truncated?)",
                data.len()
            ));
        }
        let s = Rc::new(Storage { kind, numel, data });
        storages.insert(key, s.clone());
        Ok(Value::Storage(s))
    };
    let opts = Options { torch_classes: kind == ArchiveKind::TorchScript };
    let root = pickle::unpickle(&pkl, opts, &mut load).map_err(|why| format!("{prefix}/data.pkl: {why}"))?;
    let mut named: Vec<(String, Rc<TensorRef>)> = Vec::new();
    match (kind, &root) {
        (ArchiveKind::StateDict, Value::Dict(d)) => {
            for (k, v) in d.get().iter() {
                let Value::Str(k) = k else {
                    return Err(format!("the dictionary has a key that is {}, not a tensor name", k.type_name()));
                };
                match v {
                    Value::Tensor(t) => named.push((k.to_string(), t.clone())),
                    other => {
                        return Err(format!(
                            "`{k}` is {}, not a tensor: the file must hold a state_dict (save \
                             `model.state_dict()`)",
                            other.type_name()
                        ))
                    }
                }
            }
        }
        (ArchiveKind::StateDict, other) => {
            return Err(format!("the pickle holds {}, not a state_dict of tensors", other.type_name()))
        }
        (ArchiveKind::TorchScript, Value::Object(o)) => walk(o, "", &mut named)?,
        (ArchiveKind::TorchScript, other) => {
            return Err(format!("the TorchScript archive holds {}, not a module", other.type_name()))
        }
    }
    let mut seen = HashSet::new();
    let mut total = 0u64;
    let mut out = Vec::with_capacity(named.len());
    for (name, t) in named {
        // tch's `.ot` writes `a.b` as `a|b`; no PyTorch attribute name holds a `|`.
        let name = name.replace('|', ".");
        if !seen.insert(name.clone()) {
            return Err(format!("tensor `{name}` appears twice"));
        }
        total += (t.numel() * t.storage.kind.elt_size_in_bytes()) as u64;
        if total > MAX_FILE_BYTES {
            return Err(format!("the tensors hold more than {MAX_FILE_BYTES} bytes (limit)"));
        }
        let shape = t.size.iter().map(|&d| d as i64).collect();
        out.push((name, RawTensor { kind: t.storage.kind, shape, data: t.contiguous_bytes() }));
    }
    Ok(out)
}

/// The kind, key and element count of a persistent id `('storage', torch.<Kind>Storage, key,
/// location, numel)`; the key must be a plain record name.
fn storage_id(pid: &Value) -> std::result::Result<(tch::Kind, String, usize), String> {
    let bad = || "a persistent id that is not ('storage', <storage class>, key, location, size)".to_string();
    let Value::Tuple(t) = pid else { return Err(bad()) };
    let items = t.get();
    let [Value::Str(tag), Value::Global(pickle::Global::Storage(kind)), Value::Str(key), Value::Str(_), Value::Int(n)] =
        items.as_slice()
    else {
        return Err(bad());
    };
    if &**tag != "storage" {
        return Err(bad());
    }
    if key.is_empty() || key.len() > 64 || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("storage key {key:?} is not a plain record name"));
    }
    let numel = usize::try_from(*n).map_err(|_| format!("storage `{key}` has {n} elements"))?;
    Ok((*kind, key.to_string(), numel))
}

/// Collects the tensors of a TorchScript module and its submodules under their `state_dict`
/// names (`prefix` + attribute); other attributes (flags, lists, constants) are left out.
fn walk(obj: &Node<Object>, prefix: &str, out: &mut Vec<(String, Rc<TensorRef>)>) -> std::result::Result<(), String> {
    let o = obj.get();
    let at =
        if prefix.is_empty() { "the root module".to_string() } else { format!("`{}`", &prefix[..prefix.len() - 1]) };
    let state = match &o.state {
        Some(Value::Dict(d)) => d,
        Some(other) => {
            return Err(format!("{at} (`{}`) has {} as its state, not its attributes", o.class, other.type_name()))
        }
        None => return Err(format!("{at} (`{}`) has no state", o.class)),
    };
    for (k, v) in state.get().iter() {
        let Value::Str(k) = k else {
            return Err(format!("{at} has an attribute named by {}", k.type_name()));
        };
        match v {
            Value::Tensor(t) => out.push((format!("{prefix}{k}"), t.clone())),
            Value::Object(child) => walk(child, &format!("{prefix}{k}."), out)?,
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tch::Tensor;

    /// A stored zip archive of `entries`.
    fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut z = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let stored = zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (name, bytes) in entries {
            z.start_file(*name, stored).unwrap();
            z.write_all(bytes).unwrap();
        }
        z.finish().unwrap().into_inner()
    }

    /// A protocol-2 pickle of `OrderedDict([(name, _rebuild_tensor_v2(storage, ...))])`.
    struct Pk(Vec<u8>);
    impl Pk {
        fn new() -> Self {
            Pk(vec![0x80, 2])
        }
        fn raw(mut self, b: &[u8]) -> Self {
            self.0.extend_from_slice(b);
            self
        }
        fn global(self, m: &str, n: &str) -> Self {
            self.raw(format!("c{m}\n{n}\n").as_bytes())
        }
        fn s(mut self, v: &str) -> Self {
            self.0.push(b'X');
            self.0.extend_from_slice(&(v.len() as u32).to_le_bytes());
            self.0.extend_from_slice(v.as_bytes());
            self
        }
        fn i(mut self, v: i32) -> Self {
            self.0.push(b'J');
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn ints(self, v: &[i32]) -> Self {
            v.iter().fold(self.raw(b"("), |p, &x| p.i(x)).raw(b"t")
        }
        fn odict(self) -> Self {
            self.global("collections", "OrderedDict").raw(b")R")
        }
        /// `name: tensor(storage (class, key, numel), offset, size, stride)` inside an open SETITEMS.
        fn tensor(
            self,
            name: &str,
            (class, key, numel): (&str, &str, i32),
            offset: i32,
            size: &[i32],
            stride: &[i32],
        ) -> Self {
            self.s(name)
                .global("torch._utils", "_rebuild_tensor_v2")
                .raw(b"((")
                .s("storage")
                .global("torch", class)
                .s(key)
                .s("cpu")
                .i(numel)
                .raw(b"tQ")
                .i(offset)
                .ints(size)
                .ints(stride)
                .raw(b"\x89")
                .odict()
                .raw(b"tR")
        }
        fn state_dict(tensors: impl FnOnce(Pk) -> Pk) -> Vec<u8> {
            tensors(Pk::new().odict().raw(b"(")).raw(b"u.").0
        }
    }

    fn floats(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// An archive holding `pkl` and the float records `records`.
    fn torch_archive(pkl: &[u8], records: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let names: Vec<String> = records.iter().map(|(k, _)| format!("archive/data/{k}")).collect();
        let mut entries: Vec<(&str, &[u8])> = vec![("archive/data.pkl", pkl), ("archive/byteorder", b"little")];
        entries.extend(names.iter().zip(records).map(|(n, (_, b))| (n.as_str(), b.as_slice())));
        archive(&entries)
    }

    fn exported() -> Vec<u8> {
        let named = vec![
            ("a.weight".to_string(), Tensor::from_slice(&[1f32, 2., 3., 4., 5., 6.]).view([2, 3])),
            ("a.num_batches_tracked".to_string(), Tensor::from_slice(&[7i64]).view([])),
        ];
        let mut buf = Cursor::new(Vec::new());
        super::super::torchsave::write_state_dict(&named, &mut buf, std::path::Path::new("x.pt")).unwrap();
        buf.into_inner()
    }

    #[test]
    fn what_export_writes_reads_back() {
        let bytes = exported();
        assert!(is_torch_archive(&bytes));
        let got = parse(&bytes).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].0.as_str(), got[0].1.kind, got[0].1.shape.clone()),
            ("a.weight", tch::Kind::Float, vec![2, 3])
        );
        assert_eq!(got[0].1.data, floats(&[1., 2., 3., 4., 5., 6.]));
        assert_eq!(got[1].1.as_i64().unwrap(), 7);
        assert!(got[1].1.shape.is_empty());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = exported();
        for cut in 0..bytes.len() {
            assert!(parse(&bytes[..cut]).is_err(), "cut at {cut} of {} accepted", bytes.len());
        }
    }

    #[test]
    fn strided_views_are_copied_in_row_major_order() {
        // A 3 x 2 transpose of a 2 x 3 storage, and every other element from offset 1.
        let pkl = Pk::state_dict(|p| {
            p.tensor("t", ("FloatStorage", "0", 6), 0, &[3, 2], &[1, 3]).tensor(
                "s",
                ("FloatStorage", "0", 6),
                1,
                &[3],
                &[2],
            )
        });
        let got = parse(&torch_archive(&pkl, &[("0", floats(&[0., 1., 2., 3., 4., 5.]))])).unwrap();
        assert_eq!(got[0].1.data, floats(&[0., 3., 1., 4., 2., 5.]));
        assert_eq!(got[1].1.data, floats(&[1., 3., 5.]));
    }

    #[test]
    fn forbidden_globals_are_refused_naming_them() {
        // What `__reduce__` returning (os.system, ("echo",)) pickles to, at protocols 2 and 4.
        let p2 = Pk::new().global("os", "system").s("echo").raw(b"\x85R.").0;
        let mut p4 = vec![0x80, 4, 0x8c, 2];
        p4.extend_from_slice(b"os");
        p4.extend_from_slice(&[0x8c, 6]);
        p4.extend_from_slice(b"system\x93");
        p4.extend_from_slice(b"\x8c\x04echo\x85R.");
        for (what, pkl, script) in [
            ("os.system", p2.clone(), false),
            ("os.system", p4, false),
            ("os.system", p2, true),
            ("builtins.eval", Pk::new().global("builtins", "eval").s("1").raw(b"\x85R.").0, true),
            // A TorchScript class outside a TorchScript archive.
            ("__torch__.Evil", Pk::new().global("__torch__", "Evil").raw(b")\x81.").0, false),
        ] {
            let mut entries: Vec<(&str, &[u8])> = vec![("archive/data.pkl", &pkl)];
            if script {
                entries.push(("archive/constants.pkl", b"\x80\x02).".as_slice()));
            }
            let e = parse(&archive(&entries)).unwrap_err();
            assert!(e.contains(what) && e.contains("refused"), "{what}: {e}");
        }
    }

    #[test]
    fn bad_storages_are_refused() {
        let one = |p: Pk| p.tensor("w", ("FloatStorage", "0", 4), 0, &[4], &[1]);
        type Case<'a> = (Vec<u8>, Vec<(&'a str, Vec<u8>)>, &'a str);
        let cases: Vec<Case> = vec![
            // The record holds fewer bytes than its elements need.
            (Pk::state_dict(one), vec![("0", floats(&[1., 2.]))], "holds 8 bytes"),
            // ... or more.
            (Pk::state_dict(one), vec![("0", floats(&[1.; 5]))], "more than 16 bytes"),
            // No record at all.
            (Pk::state_dict(one), vec![], "archive/data/0"),
            // The tensor reaches past its storage, by size or by offset.
            (
                Pk::state_dict(|p| p.tensor("w", ("FloatStorage", "0", 4), 0, &[5], &[1])),
                vec![("0", floats(&[1.; 4]))],
                "reaches element 4",
            ),
            (
                Pk::state_dict(|p| p.tensor("w", ("FloatStorage", "0", 4), 3, &[2, 1], &[1, 1])),
                vec![("0", floats(&[1.; 4]))],
                "reaches element",
            ),
            (
                Pk::state_dict(|p| p.tensor("w", ("FloatStorage", "0", 4), -1, &[1], &[1])),
                vec![("0", floats(&[1.; 4]))],
                "negative",
            ),
            // A key that is no plain record name.
            (
                Pk::state_dict(|p| p.tensor("w", ("FloatStorage", "../0", 4), 0, &[4], &[1])),
                vec![("0", floats(&[1.; 4]))],
                "plain record name",
            ),
            // One storage named with two kinds.
            (
                Pk::state_dict(|p| one(p).tensor("v", ("LongStorage", "0", 2), 0, &[2], &[1])),
                vec![("0", floats(&[1.; 4]))],
                "storage `0`",
            ),
            // A storage class the reader does not know, a name that is not a tensor, a repeated name.
            (
                Pk::state_dict(|p| p.tensor("w", ("ComplexFloatStorage", "0", 4), 0, &[4], &[1])),
                vec![("0", floats(&[1.; 4]))],
                "torch.ComplexFloatStorage",
            ),
            (Pk::state_dict(|p| p.s("epoch").i(3)), vec![], "`epoch` is an int, not a tensor"),
            (Pk::state_dict(|p| one(one(p))), vec![("0", floats(&[1.; 4]))], "appears twice"),
        ];
        for (pkl, records, words) in cases {
            let e = parse(&torch_archive(&pkl, &records)).unwrap_err();
            assert!(e.contains(words), "expected `{words}` in: {e}");
        }
    }

    #[test]
    fn big_endian_and_old_archives_are_refused() {
        let pkl = Pk::state_dict(|p| p);
        let e = parse(&archive(&[("a/data.pkl", &pkl), ("a/byteorder", b"big")])).unwrap_err();
        assert!(e.contains("big"), "{e}");
        let e = parse(&archive(&[("a/attributes.pkl", b"."), ("a/model.json", b"{}")])).unwrap_err();
        assert!(e.contains("1.4"), "{e}");
        assert!(!is_torch_archive(&archive(&[("w.npy", b"x")])));
    }

    #[test]
    fn mutated_pickles_never_panic() {
        let bytes = exported();
        let mut z = zip::ZipArchive::new(Cursor::new(bytes.as_slice())).unwrap();
        let mut pkl = Vec::new();
        z.by_name("archive/data.pkl").unwrap().read_to_end(&mut pkl).unwrap();
        let records: Vec<(String, Vec<u8>)> = ["0", "1"]
            .iter()
            .map(|k| {
                let mut b = Vec::new();
                z.by_name(&format!("archive/data/{k}")).unwrap().read_to_end(&mut b).unwrap();
                (k.to_string(), b)
            })
            .collect();
        let records: Vec<(&str, Vec<u8>)> = records.iter().map(|(k, b)| (k.as_str(), b.clone())).collect();
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut refused = 0;
        for _ in 0..3000 {
            let mut p = pkl.clone();
            for _ in 0..1 + next() % 3 {
                let at = (next() % p.len() as u64) as usize;
                p[at] = next() as u8;
            }
            if next() % 4 == 0 {
                p.truncate((next() % p.len() as u64) as usize);
            }
            refused += parse(&torch_archive(&p, &records)).is_err() as usize;
        }
        assert!(refused > 300, "mutations are refused ({refused} of 3000)");
    }
}
