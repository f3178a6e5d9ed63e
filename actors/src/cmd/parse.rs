//! Values of command-line flags shared by several subcommands.

/// `a` or `a,b,c` as three positive numbers.
pub fn spacing(s: &str) -> Result<[f64; 3], String> {
    let v: Vec<f64> =
        s.split(',').map(|x| x.trim().parse::<f64>().map_err(|e| format!("`{x}`: {e}"))).collect::<Result<_, _>>()?;
    let v = match v.as_slice() {
        [a] => [*a; 3],
        [a, b, c] => [*a, *b, *c],
        _ => return Err("give one value or three (X,Y,Z)".into()),
    };
    if v.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
        return Err("spacing must be positive".into());
    }
    Ok(v)
}

/// `X,Y,Z` as three positive integers.
pub fn size(s: &str) -> Result<[usize; 3], String> {
    let v: Vec<usize> =
        s.split(',').map(|x| x.trim().parse::<usize>().map_err(|e| format!("`{x}`: {e}"))).collect::<Result<_, _>>()?;
    match v.as_slice() {
        [a, b, c] if *a > 0 && *b > 0 && *c > 0 => Ok([*a, *b, *c]),
        _ => Err("give three positive integers X,Y,Z".into()),
    }
}

/// A finite number above 0 (`--hours`, `--memory`).
pub fn positive(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("`{s}`: {e}"))?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("must be a number above 0, got {s}"))
    }
}
