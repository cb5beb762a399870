//! Plugins written as component text, so the sandbox tests need no guest toolchain.
//!
//! Every fixture implements the `plugin` world by hand. Misbehaving fixtures behave (echo the
//! request) on attempt 1, which is what the load-time probe sends, and misbehave from attempt 2
//! on, so a test can load them and then watch the runtime contain them.

/// The request as fifteen flat core parameters, in WIT field order.
const PARAMS: &str = "(param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32)";

/// Writes `Ok(request)` at address 256 from the parameters; `headers` replaces the input headers
/// with `(ptr len)` when given.
fn echo(headers: Option<(u32, u32)>) -> String {
    let mut out = String::from("(i32.store8 (i32.const 256) (i32.const 0))\n");
    for field in 0..14u32 {
        let value = match (field, headers) {
            (4, Some((ptr, _))) => format!("(i32.const {ptr})"),
            (5, Some((_, len))) => format!("(i32.const {len})"),
            _ => format!("(local.get {field})"),
        };
        out += &format!("(i32.store (i32.const {}) {value})\n", 260 + 4 * field);
    }
    out + "(i32.store (i32.const 316) (local.get 14))\n"
}

/// A bump allocator that grows memory as needed, for the canonical ABI.
const REALLOC: &str = r#"
    (global $next (mut i32) (i32.const 1024))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $ptr i32)
      (local.set $ptr (i32.and (i32.add (global.get $next) (i32.sub (local.get 2) (i32.const 1)))
                               (i32.sub (i32.const 0) (local.get 2))))
      (global.set $next (i32.add (local.get $ptr) (local.get 3)))
      (if (i32.gt_u (global.get $next) (i32.mul (memory.size) (i32.const 65536)))
        (then (drop (memory.grow (i32.add (i32.const 1)
          (i32.div_u (i32.sub (global.get $next) (i32.mul (memory.size) (i32.const 65536)))
                     (i32.const 65536)))))))
      (local.get $ptr))
"#;

/// The world's types, exported so the `transform` export may use them.
const TYPES: &str = r#"
  (type $req' (record (field "method" string) (field "url" string)
    (field "headers" (list (tuple string string))) (field "body" (list u8))
    (field "partner-id" string) (field "request-id" string) (field "notification-id" string)
    (field "attempt" u32)))
  (export $req "outbound-request" (type $req'))
  (type $err' (variant (case "bad-config" string) (case "host-call" string)
    (case "bad-request" string) (case "other" string)))
  (export $err "plugin-error" (type $err'))
"#;

/// Lifts `transform` of instance `$i`, with memory and realloc from instance `memory_from`.
fn lift(memory_from: &str) -> String {
    format!(
        r#"(func $transform (param "req" $req) (result (result $req (error $err)))
    (canon lift (core func $i "transform") (memory (core memory {memory_from} "memory"))
      (realloc (core func {memory_from} "realloc"))))
  (export "transform" (func $transform))"#
    )
}

/// A component whose `transform` runs `misbehave` from attempt 2 on (or always, when `always`).
fn plugin(data: &str, misbehave: &str, always: bool) -> String {
    let guard = if always {
        String::new()
    } else {
        format!(
            "(if (i32.eq (local.get 14) (i32.const 1)) (then {} (return (i32.const 256))))",
            echo(None)
        )
    };
    format!(
        r#"(component {TYPES}
  (core module $m
    (memory (export "memory") 1) {REALLOC} {data}
    (func (export "transform") {PARAMS} (result i32) {guard} {misbehave}))
  (core instance $i (instantiate $m))
  {lift})"#,
        lift = lift("$i")
    )
}

/// Returns the request unchanged but with the single header `x-version: <marker>`.
pub(crate) fn echo_version(marker: &str) -> String {
    let data = format!(
        r#"(data (i32.const 16) "x-version") (data (i32.const 32) "{marker}")
           (data (i32.const 64) "\10\00\00\00\09\00\00\00\20\00\00\00\{:02x}\00\00\00")"#,
        marker.len()
    );
    plugin(&data, &(echo(Some((64, 1))) + "(i32.const 256)"), true)
}

/// Loops forever.
pub(crate) fn infinite_loop(always: bool) -> String {
    plugin("", "(loop $forever (br $forever)) (unreachable)", always)
}

/// Grows memory a MiB at a time until refused, then traps.
pub(crate) fn memory_bomb() -> String {
    let grow = "(loop $more (br_if $more (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) (unreachable)";
    plugin("", grow, false)
}

/// Returns the request with a 100 MiB body.
pub(crate) fn huge_body() -> String {
    let body = format!(
        "(drop (memory.grow (i32.const 1700))) {} (i32.store (i32.const 284) (i32.const 0)) \
         (i32.store (i32.const 288) (i32.const 104857600)) (i32.const 256)",
        echo(None)
    );
    plugin("", &body, false)
}

/// Executes `unreachable`, as a Rust panic does.
pub(crate) fn trap() -> String {
    plugin("", "(unreachable)", false)
}

/// Returns `Err(other("nope"))`.
pub(crate) fn guest_error() -> String {
    let body = "(i32.store8 (i32.const 256) (i32.const 1)) (i32.store8 (i32.const 260) (i32.const 3)) \
        (i32.store (i32.const 264) (i32.const 16)) (i32.store (i32.const 268) (i32.const 4)) (i32.const 256)";
    plugin(r#"(data (i32.const 16) "nope")"#, body, false)
}

/// Returns the request with method GET, which plugins may not send.
pub(crate) fn wrong_method() -> String {
    let body = format!(
        "{} (i32.store (i32.const 260) (i32.const 16)) (i32.store (i32.const 264) (i32.const 3)) (i32.const 256)",
        echo(None)
    );
    plugin(r#"(data (i32.const 16) "GET")"#, &body, false)
}

/// Exports a `transform` of the wrong type.
pub(crate) fn wrong_world() -> &'static str {
    r#"(component
  (core module $m (func (export "f") (result i32) (i32.const 0)))
  (core instance $i (instantiate $m))
  (func $f (result u32) (canon lift (core func $i "f")))
  (export "transform" (func $f)))"#
}

/// Exports nothing.
pub(crate) fn no_export() -> &'static str {
    "(component)"
}

/// Imports a filesystem interface, which plugins never get.
pub(crate) fn wants_files() -> &'static str {
    r#"(component (import "wasi:filesystem/preopens@0.2.0" (instance)))"#
}

/// From attempt 2 on, asks the host for an HMAC with key `key` and returns the host's error as
/// `Err(other(..))`; traps if the host signed.
pub(crate) fn uses_key(key: &str) -> String {
    let guard = format!(
        "(if (i32.eq (local.get 14) (i32.const 1)) (then {} (return (i32.const 256))))",
        echo(None)
    );
    format!(
        r#"(component
  (import "api-notify:plugin/host@0.1.0" (instance $host
    (export "hmac-sha256" (func (param "key-name" string) (param "data" (list u8))
      (result (result (list u8) (error string)))))))
  {TYPES}
  (core module $alloc (memory (export "memory") 1) {REALLOC})
  (core instance $mem (instantiate $alloc))
  (core func $hmac (canon lower (func $host "hmac-sha256") (memory (core memory $mem "memory")) (realloc (core func $mem "realloc"))))
  (core module $m
    (import "env" "memory" (memory 1))
    (import "env" "hmac" (func $hmac (param i32 i32 i32 i32 i32)))
    (data (i32.const 16) "{key}")
    (func (export "transform") {PARAMS} (result i32) {guard}
      (call $hmac (i32.const 16) (i32.const {len}) (i32.const 16) (i32.const {len}) (i32.const 512))
      (if (i32.eqz (i32.load8_u (i32.const 512))) (then (unreachable)))
      (i32.store8 (i32.const 256) (i32.const 1)) (i32.store8 (i32.const 260) (i32.const 3))
      (i32.store (i32.const 264) (i32.load (i32.const 516)))
      (i32.store (i32.const 268) (i32.load (i32.const 520)))
      (i32.const 256)))
  (alias core export $mem "memory" (core memory $memory))
  (core instance $env (export "memory" (memory $memory)) (export "hmac" (func $hmac)))
  (core instance $i (instantiate $m (with "env" (instance $env))))
  {lift})"#,
        len = key.len(),
        lift = lift("$mem")
    )
}
