//! The Lua scripts that make each lock operation atomic on the Redis server.
//!
//! Each script is one round trip, and Redis runs it without interleaving other commands, so
//! "check the owner, then act" cannot race with another client's acquisition.

use redis::Script;

/// `SET lock token NX PX lease` and, only if that succeeded, issue the next fencing token
/// in the same step, so a token always belongs to exactly one acquisition.
///
/// Tokens are `max(server clock in µs, last token + 1)`: strictly increasing while the
/// counter lives, and still increasing after it expired or Redis lost its data, because no
/// key can be acquired more than once per microsecond. Needs Redis >= 5 (scripts replicate
/// their effects, so `TIME` may precede writes).
///
/// KEYS: lock, fence counter. ARGV: owner token, lease ms, fence counter ttl ms.
/// Returns the fencing token, or 0 when the lock is held.
const ACQUIRE: &str = r"
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 0
end
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local fence = math.max(now_us, last + 1)
redis.call('SET', KEYS[2], string.format('%d', fence), 'PX', ARGV[3])
return fence
";

/// [`ACQUIRE`] for many locks in one round trip: each key is tried on its own, so a busy key
/// does not stop the others.
/// KEYS: lock 1, fence counter 1, lock 2, fence counter 2, ... ARGV: lease ms, fence counter
/// ttl ms, owner token 1, owner token 2, ... Returns one fencing token per lock, 0 where held.
const ACQUIRE_MANY: &str = r"
local fences = {}
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
for i = 1, #KEYS / 2 do
  local lock, counter = KEYS[2 * i - 1], KEYS[2 * i]
  if redis.call('SET', lock, ARGV[2 + i], 'NX', 'PX', ARGV[1]) then
    local last = tonumber(redis.call('GET', counter) or '0')
    local fence = math.max(now_us, last + 1)
    redis.call('SET', counter, string.format('%d', fence), 'PX', ARGV[2])
    fences[i] = fence
  else
    fences[i] = 0
  end
end
return fences
";

/// Compare-and-extend: only the owner may push the expiry out.
/// KEYS: lock. ARGV: owner token, lease ms. Returns 1 if extended, 0 if not the owner.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Compare-and-delete: an expired holder can never delete its successor's lock.
/// KEYS: lock. ARGV: owner token. Returns 1 if deleted, 0 if not the owner.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// [`RELEASE`] for many locks in one round trip.
/// KEYS: locks. ARGV: their owner tokens, in the same order. Returns how many were deleted.
const RELEASE_MANY: &str = r"
local deleted = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i] then
    deleted = deleted + redis.call('DEL', KEYS[i])
  end
end
return deleted
";

/// The scripts, hashed once; `EVALSHA` falls back to loading them (e.g. after a restart).
pub(crate) struct Scripts {
    pub(crate) acquire: Script,
    pub(crate) acquire_many: Script,
    pub(crate) renew: Script,
    pub(crate) release: Script,
    pub(crate) release_many: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Self {
            acquire: Script::new(ACQUIRE),
            acquire_many: Script::new(ACQUIRE_MANY),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
            release_many: Script::new(RELEASE_MANY),
        }
    }
}
