//! A restricted unpickler for the pickles inside PyTorch's weights files (`torch.save` of a
//! `state_dict`, TorchScript archives, tch's `.ot`): only the opcodes those files use (protocols
//! 2 to 5, no text opcodes) and only the globals they name (`collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter`, the typed storage classes,
//! `torch.jit._pickle.build_*list`, and with [`Options::torch_classes`] the `__torch__.*` classes
//! of TorchScript modules, which only become plain objects holding their state). Nothing is
//! imported or called: a global is a tag, REDUCE of a tag builds a value here, anything else
//! (`os.system`, `builtins.eval`, a pickled Python class) is an error naming it.
//!
//! Hostile input cannot make it loop, recurse without bound or allocate without bound: values
//! nest at most [`MAX_DEPTH`] deep, a container placed inside another can no longer change (so
//! no cycle can be built and every depth is known when a value is made), the stack and the memo
//! hold at most [`MAX_VALUES`] values, and every length is checked against the bytes left.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use tch::Kind;

/// The deepest nesting of containers taken (a V-Net's TorchScript archive nests about 20 deep).
pub const MAX_DEPTH: usize = 256;

/// The most values the stack and the memo may hold together.
pub const MAX_VALUES: usize = 1 << 22;

/// Why a pickle is refused.
pub type Refusal = String;

/// What may be unpickled.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Take `__torch__.*` classes (TorchScript modules) as plain objects: NEWOBJ without
    /// arguments, then BUILD with their state.
    pub torch_classes: bool,
}

/// A global the unpickler takes, as a tag (nothing is looked up or called).
#[derive(Debug, Clone, PartialEq)]
pub enum Global {
    /// `collections.OrderedDict`: called without arguments, an empty dictionary.
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`.
    RebuildTensor,
    /// `torch._utils._rebuild_parameter(tensor, requires_grad, hooks)` (and `_with_state`).
    RebuildParameter,
    /// `torch.<Kind>Storage`: only inside a persistent id.
    Storage(Kind),
    /// `torch.jit._pickle.build_{int,double,bool,tensor,str}list(list)`: the list itself.
    BuildList,
    /// A `__torch__.*` class (a TorchScript module or class), by its qualified name.
    Class(Rc<str>),
}

/// A container's content, its nesting depth and whether it may still change.
#[derive(Debug)]
pub struct Node<T> {
    /// The content.
    items: RefCell<T>,
    /// 1 + the deepest value inside.
    depth: Cell<usize>,
    /// Placed inside another value: no longer changes.
    frozen: Cell<bool>,
}

impl<T> Node<T> {
    fn new(items: T, depth: usize) -> Rc<Self> {
        Rc::new(Node { items: RefCell::new(items), depth: Cell::new(depth), frozen: Cell::new(false) })
    }

    /// The content.
    pub fn get(&self) -> std::cell::Ref<'_, T> {
        self.items.borrow()
    }
}

/// An object of a `__torch__` class: its class and the state BUILD gave it.
#[derive(Debug)]
pub struct Object {
    /// The qualified class name (`__torch__.torch.nn.modules.conv.Conv3d`).
    pub class: Rc<str>,
    /// The state (a TorchScript module's: a dictionary of its attributes), once built.
    pub state: Option<Value>,
}

/// A storage: the bytes of one record of the archive, with its element kind.
#[derive(Debug)]
pub struct Storage {
    /// Element kind.
    pub kind: Kind,
    /// Elements (`data.len() / kind.elt_size_in_bytes()`).
    pub numel: usize,
    /// Little-endian element bytes.
    pub data: Vec<u8>,
}

/// A tensor as `_rebuild_tensor_v2` describes it, checked to lie inside its storage.
#[derive(Debug)]
pub struct TensorRef {
    /// The storage it views.
    pub storage: Rc<Storage>,
    /// First element, in elements.
    pub offset: usize,
    /// Dimensions.
    pub size: Vec<usize>,
    /// Strides, in elements.
    pub stride: Vec<usize>,
}

impl TensorRef {
    /// Elements of the tensor.
    pub fn numel(&self) -> usize {
        self.size.iter().product()
    }

    /// The elements' bytes in row-major order.
    pub fn contiguous_bytes(&self) -> Vec<u8> {
        let elt = self.storage.kind.elt_size_in_bytes();
        let n = self.numel();
        let mut out = Vec::with_capacity(n * elt);
        if n == 0 {
            return out;
        }
        let row_major = {
            let mut expect = 1usize;
            let mut ok = true;
            for (&s, &st) in self.size.iter().zip(&self.stride).rev() {
                if s != 1 && st != expect {
                    ok = false;
                }
                expect *= s;
            }
            ok
        };
        let data = &self.storage.data;
        if row_major {
            out.extend_from_slice(&data[self.offset * elt..(self.offset + n) * elt]);
            return out;
        }
        let mut index = vec![0usize; self.size.len()];
        for _ in 0..n {
            let at = self.offset + index.iter().zip(&self.stride).map(|(i, s)| i * s).sum::<usize>();
            out.extend_from_slice(&data[at * elt..(at + 1) * elt]);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < self.size[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        out
    }
}

/// An unpickled value.
#[derive(Debug, Clone)]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer (at most 64 bits).
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(Rc<str>),
    /// A tuple.
    Tuple(Rc<Node<Vec<Value>>>),
    /// A list.
    List(Rc<Node<Vec<Value>>>),
    /// A dictionary or `OrderedDict`, in insertion order.
    Dict(Rc<Node<Vec<(Value, Value)>>>),
    /// A global, as a tag.
    Global(Global),
    /// An object of a `__torch__` class.
    Object(Rc<Node<Object>>),
    /// A storage, from a persistent id.
    Storage(Rc<Storage>),
    /// A tensor.
    Tensor(Rc<TensorRef>),
}

impl Value {
    /// A short name of the value's type, for errors.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a global",
            Value::Object(_) => "an object",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }

    /// Nesting depth: 0 for scalars, tensors and storages.
    fn depth(&self) -> usize {
        match self {
            Value::Tuple(n) | Value::List(n) => n.depth.get(),
            Value::Dict(n) => n.depth.get(),
            Value::Object(n) => n.depth.get(),
            _ => 0,
        }
    }

    /// Marks a container as placed inside another: it no longer changes.
    fn freeze(&self) {
        match self {
            Value::Tuple(n) | Value::List(n) => n.frozen.set(true),
            Value::Dict(n) => n.frozen.set(true),
            Value::Object(n) => n.frozen.set(true),
            _ => {}
        }
    }

    /// The address of a container (to refuse putting one inside itself).
    fn address(&self) -> Option<*const ()> {
        match self {
            Value::Tuple(n) | Value::List(n) => Some(Rc::as_ptr(n) as *const ()),
            Value::Dict(n) => Some(Rc::as_ptr(n) as *const ()),
            Value::Object(n) => Some(Rc::as_ptr(n) as *const ()),
            _ => None,
        }
    }
}

/// The global `module.name` as a tag, or why it is refused.
fn resolve(module: &str, name: &str, opts: Options) -> Result<Global, Refusal> {
    let storage = |n: &str| -> Option<Kind> {
        Some(match n {
            "FloatStorage" => Kind::Float,
            "DoubleStorage" => Kind::Double,
            "HalfStorage" => Kind::Half,
            "BFloat16Storage" => Kind::BFloat16,
            "LongStorage" => Kind::Int64,
            "IntStorage" => Kind::Int,
            "ShortStorage" => Kind::Int16,
            "CharStorage" => Kind::Int8,
            "ByteStorage" => Kind::Uint8,
            "BoolStorage" => Kind::Bool,
            _ => return None,
        })
    };
    match (module, name) {
        ("collections", "OrderedDict") => Ok(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensor),
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => Ok(Global::RebuildParameter),
        ("torch", n) if storage(n).is_some() => Ok(Global::Storage(storage(n).expect("checked"))),
        ("torch.jit._pickle", "build_intlist" | "build_doublelist" | "build_boollist" | "build_tensorlist")
        | ("torch.jit._pickle", "build_strlist") => Ok(Global::BuildList),
        (m, n) if opts.torch_classes && (m == "__torch__" || m.starts_with("__torch__.")) => {
            Ok(Global::Class(format!("{m}.{n}").into()))
        }
        (m, n) => Err(format!(
            "the pickle names the global `{m}.{n}`, which is not one a weights file uses (refused: \
             uamt reads state_dicts and TorchScript modules, never pickled Python objects; save \
             `model.state_dict()`)"
        )),
    }
}

/// The names of the opcodes the unpickler refuses, for errors.
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'I' => "INT",
        b'L' => "LONG",
        b'F' => "FLOAT",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8e => "BINBYTES8",
        0x8d => "BINUNICODE8",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        b'i' => "INST",
        b'o' => "OBJ",
        0x92 => "NEWOBJ_EX",
        b'P' => "PERSID",
        b'p' => "PUT",
        b'g' => "GET",
        b'l' => "LIST",
        b'd' => "DICT",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x8b => "LONG4",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        _ => "unknown",
    }
}

/// The byte reader over a pickle.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Refusal> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| format!("the pickle ends inside an operand at byte {} (truncated?)", self.pos))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Refusal> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Refusal> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, Refusal> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn line(&mut self) -> Result<&'a str, Refusal> {
        let rest = &self.bytes[self.pos..];
        let n = rest.iter().take(1024).position(|&b| b == b'\n').ok_or("a GLOBAL name without an end of line")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "a GLOBAL name that is not UTF-8".to_string())?;
        self.pos += n + 1;
        Ok(s)
    }
    fn utf8(&mut self, n: usize) -> Result<Rc<str>, Refusal> {
        let b = self.take(n)?;
        std::str::from_utf8(b).map(Rc::from).map_err(|_| format!("a string that is not UTF-8 before byte {}", self.pos))
    }
}

/// The unpickler's state.
struct Machine {
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    opts: Options,
}

impl Machine {
    fn push(&mut self, v: Value) -> Result<(), Refusal> {
        if self.stack.len() + self.memo.len() >= MAX_VALUES {
            return Err(format!("more than {MAX_VALUES} values"));
        }
        self.stack.push(v);
        Ok(())
    }
    fn pop(&mut self) -> Result<Value, Refusal> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("an opcode takes a value across a MARK".into());
        }
        self.stack.pop().ok_or_else(|| "an opcode takes a value from an empty stack".into())
    }
    fn top(&self) -> Result<&Value, Refusal> {
        self.stack.last().ok_or_else(|| "an opcode needs a value on an empty stack".into())
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>, Refusal> {
        let m = self.marks.pop().ok_or("an opcode needs a MARK that is not there")?;
        Ok(self.stack.split_off(m))
    }
    fn memo_put(&mut self, key: u32) -> Result<(), Refusal> {
        let v = self.top()?.clone();
        if self.stack.len() + self.memo.len() >= MAX_VALUES {
            return Err(format!("more than {MAX_VALUES} values"));
        }
        self.memo.insert(key, v);
        Ok(())
    }
    fn memo_get(&mut self, key: u32) -> Result<(), Refusal> {
        let v = self.memo.get(&key).cloned().ok_or_else(|| format!("memo entry {key} read before it was written"))?;
        self.push(v)
    }
}

/// A tuple of `items` (each then frozen).
fn tuple(items: Vec<Value>) -> Result<Value, Refusal> {
    let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
    if depth > MAX_DEPTH {
        return Err(format!("values nested more than {MAX_DEPTH} deep"));
    }
    items.iter().for_each(Value::freeze);
    let n = Node::new(items, depth);
    n.frozen.set(true);
    Ok(Value::Tuple(n))
}

/// Checks that `container` may take `items` and returns its new depth.
fn admit<T>(container: &Node<T>, addr: *const (), items: &[&Value]) -> Result<usize, Refusal> {
    if container.frozen.get() {
        return Err("the pickle changes a container that is already inside another value (refused)".into());
    }
    let mut depth = container.depth.get();
    for v in items {
        if v.address() == Some(addr) {
            return Err("the pickle puts a container inside itself (refused)".into());
        }
        depth = depth.max(v.depth() + 1);
    }
    if depth > MAX_DEPTH {
        return Err(format!("values nested more than {MAX_DEPTH} deep"));
    }
    items.iter().for_each(|v| v.freeze());
    Ok(depth)
}

/// Appends `items` to the list `target`.
fn append(target: &Value, items: Vec<Value>) -> Result<(), Refusal> {
    let Value::List(n) = target else {
        return Err(format!("APPEND(S) to {}, not a list", target.type_name()));
    };
    let depth = admit(n, Rc::as_ptr(n) as *const (), &items.iter().collect::<Vec<_>>())?;
    n.depth.set(depth);
    n.items.borrow_mut().extend(items);
    Ok(())
}

/// Sets `pairs` (key, value, key, value, ...) in the dictionary `target`.
fn set_items(target: &Value, pairs: Vec<Value>) -> Result<(), Refusal> {
    let Value::Dict(n) = target else {
        return Err(format!("SETITEM(S) on {}, not a dict", target.type_name()));
    };
    if !pairs.len().is_multiple_of(2) {
        return Err("SETITEMS with a key and no value".into());
    }
    let depth = admit(n, Rc::as_ptr(n) as *const (), &pairs.iter().collect::<Vec<_>>())?;
    n.depth.set(depth);
    // Kept in order; a repeated key is kept twice (the readers refuse repeated names).
    let mut items = n.items.borrow_mut();
    let mut it = pairs.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        items.push((k, v));
    }
    Ok(())
}

/// An integer operand of `what`, non-negative.
fn non_negative(v: &Value, what: &str) -> Result<usize, Refusal> {
    match v {
        Value::Int(i) if *i >= 0 => usize::try_from(*i).map_err(|_| format!("{what} {i} too large")),
        Value::Int(i) => Err(format!("{what} is negative ({i})")),
        other => Err(format!("{what} is {}, not an int", other.type_name())),
    }
}

/// A tuple of non-negative integers (a size or stride).
fn int_tuple(v: &Value, what: &str) -> Result<Vec<usize>, Refusal> {
    let Value::Tuple(n) = v else {
        return Err(format!("{what} is {}, not a tuple", v.type_name()));
    };
    let items = n.get();
    if items.len() > 64 {
        return Err(format!("{what} has {} dimensions", items.len()));
    }
    items.iter().map(|d| non_negative(d, what)).collect()
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`, checked
/// against the storage.
fn rebuild_tensor(args: &[Value]) -> Result<Value, Refusal> {
    if !(6..=7).contains(&args.len()) {
        return Err(format!("_rebuild_tensor_v2 with {} arguments, not 6 or 7", args.len()));
    }
    let Value::Storage(storage) = &args[0] else {
        return Err(format!("_rebuild_tensor_v2 of {}, not a storage", args[0].type_name()));
    };
    let offset = non_negative(&args[1], "the storage offset")?;
    let size = int_tuple(&args[2], "the size")?;
    let stride = int_tuple(&args[3], "the stride")?;
    if size.len() != stride.len() {
        return Err(format!("size {size:?} and stride {stride:?} differ in length"));
    }
    if !matches!(args[4], Value::Bool(_)) {
        return Err(format!("requires_grad is {}, not a bool", args[4].type_name()));
    }
    let too_big = || format!("a tensor of size {size:?} is too large");
    let numel = size.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(too_big)?;
    let elt = storage.kind.elt_size_in_bytes();
    if numel.checked_mul(elt).is_none_or(|b| b as u64 > super::tensorfile::MAX_FILE_BYTES) {
        return Err(too_big());
    }
    if numel > 0 {
        let reach = size
            .iter()
            .zip(&stride)
            .try_fold(offset, |a, (&d, &s)| (d - 1).checked_mul(s).and_then(|x| a.checked_add(x)))
            .ok_or_else(too_big)?;
        if reach >= storage.numel {
            return Err(format!(
                "a tensor of size {size:?}, stride {stride:?} at offset {offset} reaches element {reach} of a \
                 storage of {} elements",
                storage.numel
            ));
        }
    } else if offset > storage.numel {
        return Err(format!("offset {offset} past a storage of {} elements", storage.numel));
    }
    Ok(Value::Tensor(Rc::new(TensorRef { storage: storage.clone(), offset, size, stride })))
}

/// REDUCE: `callable(*args)` for the callables this unpickler knows.
fn reduce(callable: Value, args: Value) -> Result<Value, Refusal> {
    let Value::Global(g) = callable else {
        return Err(format!("REDUCE calls {}, not a known global", callable.type_name()));
    };
    let Value::Tuple(args) = args else {
        return Err(format!("REDUCE with {} as its arguments, not a tuple", args.type_name()));
    };
    let args = args.get();
    match g {
        Global::OrderedDict if args.is_empty() => Ok(Value::Dict(Node::new(Vec::new(), 1))),
        Global::OrderedDict => Err("OrderedDict called with arguments".into()),
        Global::RebuildTensor => rebuild_tensor(&args),
        Global::RebuildParameter => match args.first() {
            Some(t @ Value::Tensor(_)) if (3..=4).contains(&args.len()) => Ok(t.clone()),
            _ => Err("_rebuild_parameter without a tensor and 3 or 4 arguments".into()),
        },
        Global::BuildList => match args.as_slice() {
            [l @ Value::List(_)] => Ok(l.clone()),
            _ => Err("torch.jit._pickle.build_*list without one list".into()),
        },
        Global::Storage(_) => Err("a storage class is called (only persistent ids name storages)".into()),
        Global::Class(c) => Err(format!("the class `{c}` is called (TorchScript objects are made by NEWOBJ)")),
    }
}

/// Unpickles `bytes` with `opts`; `persistent` turns a persistent id (BINPERSID) into a value
/// (a storage). The pickle's single result.
pub fn unpickle(
    bytes: &[u8],
    opts: Options,
    persistent: &mut dyn FnMut(&Value) -> Result<Value, Refusal>,
) -> Result<Value, Refusal> {
    let mut r = Reader { bytes, pos: 0 };
    let mut m = Machine { stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), opts };
    loop {
        let at = r.pos;
        let op = r.u8().map_err(|_| "the pickle ends without STOP (truncated?)".to_string())?;
        let mut step = |m: &mut Machine, r: &mut Reader| -> Result<bool, Refusal> {
            match op {
                0x80 => {
                    let v = r.u8()?;
                    if !(2..=5).contains(&v) {
                        return Err(format!("pickle protocol {v} (2 to 5 are read)"));
                    }
                }
                0x95 => {
                    r.take(8)?; // FRAME: a length hint only
                }
                b'.' => return Ok(true),
                b'(' => {
                    if m.marks.len() >= MAX_DEPTH * 4 {
                        return Err("too many open MARKs".into());
                    }
                    m.marks.push(m.stack.len());
                }
                b')' => m.push(tuple(Vec::new())?)?,
                b't' => {
                    let items = m.pop_mark()?;
                    m.push(tuple(items)?)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(m.pop()?);
                    }
                    items.reverse();
                    m.push(tuple(items)?)?;
                }
                b'}' => m.push(Value::Dict(Node::new(Vec::new(), 1)))?,
                b']' => m.push(Value::List(Node::new(Vec::new(), 1)))?,
                b'a' => {
                    let v = m.pop()?;
                    append(m.top()?, vec![v])?;
                }
                b'e' => {
                    let items = m.pop_mark()?;
                    append(m.top()?, items)?;
                }
                b's' => {
                    let v = m.pop()?;
                    let k = m.pop()?;
                    set_items(m.top()?, vec![k, v])?;
                }
                b'u' => {
                    let items = m.pop_mark()?;
                    set_items(m.top()?, items)?;
                }
                b'N' => m.push(Value::None)?,
                0x88 => m.push(Value::Bool(true))?,
                0x89 => m.push(Value::Bool(false))?,
                b'J' => {
                    let v = r.u32()? as i32;
                    m.push(Value::Int(v as i64))?;
                }
                b'K' => {
                    let v = r.u8()?;
                    m.push(Value::Int(v as i64))?;
                }
                b'M' => {
                    let v = r.u16()?;
                    m.push(Value::Int(v as i64))?;
                }
                0x8a => {
                    let n = r.u8()? as usize;
                    if n > 8 {
                        return Err(format!("an integer of {n} bytes (at most 8 are read)"));
                    }
                    let b = r.take(n)?;
                    let mut v: i64 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= (x as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n); // sign extension
                    }
                    m.push(Value::Int(v))?;
                }
                b'G' => {
                    let b = r.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    m.push(Value::Float(f64::from_be_bytes(a)))?;
                }
                b'X' => {
                    let n = r.u32()? as usize;
                    let s = r.utf8(n)?;
                    m.push(Value::Str(s))?;
                }
                0x8c => {
                    let n = r.u8()? as usize;
                    let s = r.utf8(n)?;
                    m.push(Value::Str(s))?;
                }
                b'q' => {
                    let k = r.u8()? as u32;
                    m.memo_put(k)?;
                }
                b'r' => {
                    let k = r.u32()?;
                    m.memo_put(k)?;
                }
                0x94 => {
                    let k = u32::try_from(m.memo.len()).map_err(|_| "memo too large".to_string())?;
                    m.memo_put(k)?;
                }
                b'h' => {
                    let k = r.u8()? as u32;
                    m.memo_get(k)?;
                }
                b'j' => {
                    let k = r.u32()?;
                    m.memo_get(k)?;
                }
                b'c' => {
                    let module = r.line()?;
                    let name = r.line()?;
                    let g = resolve(module, name, m.opts)?;
                    m.push(Value::Global(g))?;
                }
                0x93 => {
                    let name = m.pop()?;
                    let module = m.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return Err("STACK_GLOBAL without two strings".into());
                    };
                    let g = resolve(module, name, m.opts)?;
                    m.push(Value::Global(g))?;
                }
                b'R' => {
                    let args = m.pop()?;
                    let callable = m.pop()?;
                    m.push(reduce(callable, args)?)?;
                }
                0x81 => {
                    let args = m.pop()?;
                    let cls = m.pop()?;
                    let empty = matches!(&args, Value::Tuple(t) if t.get().is_empty());
                    match cls {
                        Value::Global(Global::Class(class)) if empty => {
                            m.push(Value::Object(Node::new(Object { class, state: None }, 1)))?
                        }
                        Value::Global(Global::Class(class)) => {
                            return Err(format!("NEWOBJ of `{class}` with arguments"));
                        }
                        other => return Err(format!("NEWOBJ of {}, not a TorchScript class", other.type_name())),
                    }
                }
                b'b' => {
                    let state = m.pop()?;
                    match m.top()? {
                        Value::Object(n) => {
                            let depth = admit(n, Rc::as_ptr(n) as *const (), &[&state])?;
                            let mut o = n.items.borrow_mut();
                            if o.state.is_some() {
                                return Err(format!("BUILD of `{}` twice", o.class));
                            }
                            n.depth.set(depth);
                            o.state = Some(state);
                        }
                        // torch.save's OrderedDict carries `_metadata` (module versions): unused.
                        Value::Dict(_) if matches!(state, Value::Dict(_)) => {}
                        other => return Err(format!("BUILD of {} with {}", other.type_name(), state.type_name())),
                    }
                }
                b'Q' => {
                    let pid = m.pop()?;
                    let v = persistent(&pid)?;
                    m.push(v)?;
                }
                other => {
                    return Err(format!(
                        "opcode 0x{other:02x} ({}) is not one a weights file uses (refused)",
                        opcode_name(other)
                    ))
                }
            }
            Ok(false)
        };
        match step(&mut m, &mut r) {
            Ok(false) => {}
            Ok(true) => return m.stack.pop().ok_or_else(|| "STOP on an empty stack".into()),
            Err(why) => return Err(format!("pickle byte {at}: {why}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Result<Value, Refusal> {
        unpickle(bytes, Options::default(), &mut |_| Err("no persistent ids here".into()))
    }

    #[test]
    fn nesting_is_bounded_without_recursion() {
        let mut p = vec![0x80, 2, b'K', 1];
        p.extend(std::iter::repeat_n(0x85, 100_000));
        p.push(b'.');
        assert!(run(&p).unwrap_err().contains("nested"));
        let mut ok = vec![0x80, 2, b'K', 1];
        ok.extend(std::iter::repeat_n(0x85, MAX_DEPTH));
        ok.push(b'.');
        assert!(matches!(run(&ok).unwrap(), Value::Tuple(_)));
    }

    #[test]
    fn no_cycle_can_be_built() {
        // l = []; l.append(l)
        assert!(run(b"\x80\x02]q\x00h\x00a.").unwrap_err().contains("itself"));
        // a = []; b = []; a.append(b); b.append([]): b is inside a and may no longer change.
        assert!(run(b"\x80\x02]q\x00]q\x01ah\x01]a.").unwrap_err().contains("already inside"));
        // d = {}; d['k'] = d
        assert!(run(b"\x80\x02}q\x00X\x01\x00\x00\x00kh\x00s.").unwrap_err().contains("itself"));
    }

    #[test]
    fn scalars_and_containers_read_as_python_writes_them() {
        // {'a': (1, -2, 300, 2**40, 1.5, True, None, 'é'), 'b': [1, 2]}, protocol 2.
        let mut p =
            b"\x80\x02}q\x00(X\x01\x00\x00\x00a(K\x01J\xfe\xff\xff\xffM,\x01\x8a\x06\x00\x00\x00\x00\x00\x01".to_vec();
        p.extend_from_slice(
            b"G?\xf8\x00\x00\x00\x00\x00\x00\x88NX\x02\x00\x00\x00\xc3\xa9tX\x01\x00\x00\x00b]q\x01(K\x01K\x02eu.",
        );
        let Value::Dict(d) = run(&p).unwrap() else { panic!("not a dict") };
        let d = d.get();
        let Value::Tuple(t) = &d[0].1 else { panic!("not a tuple") };
        let t = t.get();
        assert!(matches!(t[0], Value::Int(1)) && matches!(t[1], Value::Int(-2)) && matches!(t[2], Value::Int(300)));
        assert!(matches!(t[3], Value::Int(v) if v == 1 << 40));
        assert!(matches!(t[4], Value::Float(v) if v == 1.5));
        assert!(matches!(t[5], Value::Bool(true)) && matches!(t[6], Value::None));
        assert!(matches!(&t[7], Value::Str(s) if &**s == "é"));
        assert!(matches!(&d[1].1, Value::List(l) if l.get().len() == 2));
        // A negative LONG1.
        assert!(matches!(run(b"\x80\x02\x8a\x01\xff.").unwrap(), Value::Int(-1)));
    }

    #[test]
    fn refused_opcodes_and_broken_streams_are_errors() {
        for (p, words) in [
            (b"\x80\x02(S'x'\np0\n.".as_slice(), "STRING"),
            (b"\x80\x02cos\nsystem\n(X\x02\x00\x00\x00lsi.".as_slice(), "os.system"),
            (b"\x80\x02]\x8f.".as_slice(), "EMPTY_SET"),
            (b"\x80\x02K".as_slice(), "truncated"),
            (b"\x80\x02K\x01".as_slice(), "without STOP"),
            (b"\x80\x02h\x05.".as_slice(), "memo entry 5"),
            (b"\x80\x02a.".as_slice(), "empty stack"),
            (b"\x80\x09.".as_slice(), "protocol 9"),
            (b"\x80\x02X\xff\xff\xff\xff".as_slice(), "truncated"),
            (b"\x80\x02K\x01(Q.".as_slice(), "MARK"),
        ] {
            let e = run(p).unwrap_err();
            assert!(e.contains(words), "{p:?}: `{words}` missing from {e}");
        }
    }
}
