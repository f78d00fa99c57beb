//! The Lua scripts that keep a sink's shared rate in one Redis hash.
//!
//! Each operation is one round trip, and Redis runs a script without interleaving other
//! commands, so "read the state, decide, write it back" cannot race with another process.
//! All scripts read the clock with `TIME` on the Redis server: the one clock every process
//! shares, so client clock skew cannot hand out extra slots. Needs Redis >= 5 (scripts
//! replicate their effects, so `TIME` may precede writes).
//!
//! The hash (`{prefix}:throttle:{sink}`), all times in µs of the server clock:
//! - `tat`: GCRA theoretical arrival time, the end of the last reserved emission interval;
//! - `rate`: the rate set by the last cut (absent on a fresh key: the rate is `max_rate`);
//! - `cut_at`: when that cut happened;
//! - `hold_until`: no slot before this (the latest Retry-After any process was given).

use redis::Script;

/// Shared by every script: arguments, the server clock, the stored state, and the effective
/// rate. The rate is derived, never stored as it grows: `rate` at `cut_at` plus the additive
/// increase since, clamped to this caller's bounds (so a lowered `max_rate` applies at once).
///
/// KEYS: the state hash. ARGV: max rate, min rate, burst, increase per s, decrease factor,
/// cooldown µs, idle ttl µs, then one script-specific argument (ARGV[8]).
const PRELUDE: &str = r"
local key = KEYS[1]
local max_rate = tonumber(ARGV[1])
local min_rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local increase = tonumber(ARGV[4])
local factor = tonumber(ARGV[5])
local cooldown = tonumber(ARGV[6])
local idle_ttl = tonumber(ARGV[7])

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local state = redis.call('HMGET', key, 'tat', 'rate', 'cut_at', 'hold_until')
local tat = tonumber(state[1]) or 0
local cut_rate = tonumber(state[2])
local cut_at = tonumber(state[3]) or 0
local hold_until = tonumber(state[4]) or 0

local rate = max_rate
if cut_rate then
  -- A server clock that stepped back counts as no time passed, never as negative time.
  local since_cut = math.max(0, now - cut_at) / 1000000
  rate = math.max(min_rate, math.min(max_rate, cut_rate + increase * since_cut))
end

local function fmt(x)
  return string.format('%.17g', x)
end

-- The key outlives its last use by idle_ttl, and any reservation or hold still ahead by as much.
local function touch()
  local ahead = math.max(tat, hold_until, now) - now
  redis.call('PEXPIRE', key, math.ceil((ahead + idle_ttl) / 1000))
end
";

/// GCRA reserve. The emission interval is `1 / rate`; a slot may be up to `burst - 1`
/// intervals before `tat`, and never before `hold_until`. If the slot is within `max_wait`,
/// it is reserved (`tat` moves one interval past it) and the wait until it returned;
/// otherwise nothing changes and the wait is returned as a hint.
///
/// ARGV[8]: max wait µs. Returns {1 if reserved else 0, wait µs (rounded up), rate, the slot
/// in µs of the server clock (rounded up)}.
const ACQUIRE: &str = r"
local max_wait = tonumber(ARGV[8])
local interval = 1000000 / rate
local slot = math.max(now, tat - (burst - 1) * interval, hold_until)
local wait = slot - now
if wait > max_wait then
  return {0, math.ceil(wait), fmt(rate), math.ceil(slot)}
end
tat = math.max(tat, slot) + interval
redis.call('HSET', key, 'tat', fmt(tat))
touch()
return {1, math.ceil(wait), fmt(rate), math.ceil(slot)}
";

/// The third party pushed back. Cuts the rate unless another process already did within
/// `cooldown` (or the server clock stepped back past the last cut), and extends the shared
/// hold to `now + retry_after`.
///
/// A cut stretches what is left of `tat` ahead of now by `old rate / new rate`: the burst
/// tolerance is `burst - 1` intervals, so it grows in time as the rate drops, and without the
/// stretch a cut would free extra slots at once. A new hold also moves `tat` so that traffic
/// resumes paced at the (cut) rate when the hold ends: a third party that just said "too
/// many" should not get a full burst the instant it allowed traffic again.
///
/// ARGV[8]: retry-after µs, or -1 for none. Returns {1 if this call cut the rate else 0, rate}.
const THROTTLED: &str = r"
local retry_after = tonumber(ARGV[8])
local cut = 0
if now - cut_at >= cooldown or now < cut_at then
  local before = rate
  rate = math.max(min_rate, rate * factor)
  if tat > now then
    tat = now + (tat - now) * before / rate
  end
  redis.call('HSET', key, 'rate', fmt(rate), 'cut_at', fmt(now), 'tat', fmt(tat))
  cut = 1
end
if retry_after >= 0 and now + retry_after > hold_until then
  hold_until = now + retry_after
  tat = math.max(tat, hold_until + (burst - 1) * 1000000 / rate)
  redis.call('HSET', key, 'hold_until', fmt(hold_until), 'tat', fmt(tat))
end
touch()
return {cut, fmt(rate)}
";

/// The effective rate, for metrics; changes nothing. ARGV[8]: unused. Returns the rate.
const RATE: &str = r"
return fmt(rate)
";

/// The scripts, hashed once; `EVALSHA` falls back to loading them (e.g. after a restart).
pub(crate) struct Scripts {
    pub(crate) acquire: Script,
    pub(crate) throttled: Script,
    pub(crate) rate: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        let with_prelude = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Self { acquire: with_prelude(ACQUIRE), throttled: with_prelude(THROTTLED), rate: with_prelude(RATE) }
    }
}
