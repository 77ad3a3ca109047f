//! The Lua scripts of the shared state, each run atomically by Redis on
//! its own clock (`NOW`, prepended to every one, also defines `stamp`, which
//! records an instance's oldest waiter in `corral:waiting`). Their replies
//! are read into the types of [`super::protocol`].

use std::sync::LazyLock;

use redis::Script;

/// A script with the clock in front, hashed once.
fn timed(body: &str) -> Script {
    Script::new(&format!("{NOW}{body}"))
}

pub(super) static TAKE: LazyLock<Script> = LazyLock::new(|| timed(TAKE_LUA));
pub(super) static STAMP: LazyLock<Script> = LazyLock::new(|| timed(STAMP_LUA));
pub(super) static GIVE_BACK: LazyLock<Script> = LazyLock::new(|| timed(GIVE_BACK_LUA));
pub(super) static TRANSFER: LazyLock<Script> = LazyLock::new(|| timed(TRANSFER_LUA));
pub(super) static REFRESH: LazyLock<Script> = LazyLock::new(|| timed(REFRESH_LUA));
pub(super) static REGISTERED: LazyLock<Script> = LazyLock::new(|| timed(REGISTERED_LUA));

const NOW: &str = "local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function stamp(key, instance, age)
  if age >= 0 then
    redis.call('ZADD', key, now - age, instance)
  else
    redis.call('ZREM', key, instance)
  end
end
";

/// KEYS[1] slots, KEYS[2] instances, KEYS[3] waiting; ARGV cap, ttl ms,
/// member, instance, age of its oldest waiter left (ms, -1: none), age of
/// this request (ms) -> {taken 0/1, holders}, or {'lost', ''} when Redis no
/// longer lists this instance (it restarted empty): its leases must be
/// written again first. Refused, the request waits again: it counts in the
/// instance's oldest waiter.
const TAKE_LUA: &str = "if not redis.call('ZSCORE', KEYS[2], ARGV[4]) then
  return {'lost', ''}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ok = 0
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  ok = 1
  stamp(KEYS[3], ARGV[4], tonumber(ARGV[5]))
else
  stamp(KEYS[3], ARGV[4], math.max(tonumber(ARGV[5]), tonumber(ARGV[6])))
end
return {tostring(ok), table.concat(redis.call('ZRANGE', KEYS[1], 0, -1), ',')}";

/// KEYS[1] waiting; ARGV instance, age of its oldest waiter (ms, -1: none):
/// the stamp alone, written as soon as a request starts waiting here, so
/// that a slot freed on another instance before this one's next take or
/// renewal is yielded to it.
const STAMP_LUA: &str = "stamp(KEYS[1], ARGV[1], tonumber(ARGV[2]))
return 1";

/// KEYS[1] slots; ARGV member, channel, backend -> holders.
const GIVE_BACK_LUA: &str = "redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local m = table.concat(redis.call('ZRANGE', KEYS[1], 0, -1), ',')
redis.call('PUBLISH', ARGV[2], ARGV[3] .. '\\n' .. m)
return m";

/// A lease handed from a finished request to the next local waiter on the
/// same backend: kept (renewed) in one round trip, unless a live instance
/// has a waiter older than this one (`corral:waiting`: each instance's
/// oldest waiter, stamped at every take, transfer and renewal); then it is
/// given back and published like `GIVE_BACK`, with the yielding instance
/// on a third line (it does not take the slot back on its own message).
/// KEYS[1] slots, KEYS[2] instances, KEYS[3] waiting; ARGV member, ttl ms,
/// instance, age of the waiter (ms), age of the oldest left (ms, -1: none),
/// channel, backend, margin (ms) -> {'1' kept / '0' yielded / 'gone' expired / 'lost',
/// holders}.
const TRANSFER_LUA: &str = "if not redis.call('ZSCORE', KEYS[2], ARGV[3]) then
  return {'lost', ''}
end
local mine = now - tonumber(ARGV[4]) - tonumber(ARGV[8])
local outcome = '1'
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. mine)) do
  local alive = redis.call('ZSCORE', KEYS[2], m)
  if m ~= ARGV[3] and alive and tonumber(alive) > now then
    outcome = '0'
    break
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  outcome = 'gone'
end
if outcome == '1' then
  stamp(KEYS[3], ARGV[3], tonumber(ARGV[5]))
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
  return {outcome, table.concat(redis.call('ZRANGE', KEYS[1], 0, -1), ',')}
end
stamp(KEYS[3], ARGV[3], math.max(tonumber(ARGV[5]), tonumber(ARGV[4])))
redis.call('ZREM', KEYS[1], ARGV[1])
local m = table.concat(redis.call('ZRANGE', KEYS[1], 0, -1), ',')
redis.call('PUBLISH', ARGV[6], ARGV[7] .. '\\n' .. m .. '\\n' .. ARGV[3])
return {outcome, m}";

/// ARGV prefix, ttl ms, rewrite 0/1, instance, age of its oldest waiter
/// (ms, -1: none), seen Redis before 0/1, n backends, backends…,
/// n drains, drains…, then (backend, member) pairs held -> {instances,
/// rewritten 0/1, settling 0/1, holders per backend…, drained backends}.
/// It rewrites (held leases with ZADD, not ZADD XX, and the drains this
/// instance knows) when asked to or when Redis no longer lists this
/// instance. An instance that Redis listed before and no longer does means
/// Redis lost everything (restarted empty): for one lease TTL
/// (`corral:settling`) nothing is taken through it, so that every live
/// instance writes its leases again first.
const REFRESH_LUA: &str = "local p = ARGV[1]
local ttl = tonumber(ARGV[2])
local missing = not redis.call('ZSCORE', p .. 'instances', ARGV[4])
if missing and ARGV[6] == '1' then
  redis.call('SET', p .. 'settling', '1', 'PX', ttl, 'NX')
end
local rewrite = ARGV[3] == '1' or missing
redis.call('ZADD', p .. 'instances', now + ttl, ARGV[4])
redis.call('ZREMRANGEBYSCORE', p .. 'instances', '-inf', now)
local out = {tostring(redis.call('ZCARD', p .. 'instances')), rewrite and '1' or '0',
  tostring(redis.call('EXISTS', p .. 'settling'))}
stamp(p .. 'waiting', ARGV[4], tonumber(ARGV[5]))
for _, m in ipairs(redis.call('ZRANGE', p .. 'waiting', 0, -1)) do
  if not redis.call('ZSCORE', p .. 'instances', m) then
    redis.call('ZREM', p .. 'waiting', m)
  end
end
local nb = tonumber(ARGV[7])
local nd = tonumber(ARGV[8 + nb])
if rewrite then
  for k = 1, nd do
    redis.call('SADD', p .. 'drained', ARGV[8 + nb + k])
  end
end
local i = 9 + nb + nd
while i < #ARGV do
  local key = p .. 'slots:' .. ARGV[i]
  if rewrite then
    redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  else
    redis.call('ZADD', key, 'XX', now + ttl, ARGV[i + 1])
  end
  i = i + 2
end
for k = 1, nb do
  local key = p .. 'slots:' .. ARGV[7 + k]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  out[k + 3] = table.concat(redis.call('ZRANGE', key, 0, -1), ',')
end
out[nb + 4] = table.concat(redis.call('SMEMBERS', p .. 'drained'), '\\n')
return out";

/// KEYS[1] registered; ARGV mode (`set`, or `keep`: only where absent or
/// shorter), n writes, (id, url, lease ms or -1) per write, then ids to
/// delete -> (id, url, lease ms left or -1) per live registration; the
/// expired ones are deleted. A value is the url, a newline, and the
/// expiry on Redis time (`-`: no lease).
const REGISTERED_LUA: &str = "local n = tonumber(ARGV[2])
for k = 0, n - 1 do
  local id, url, lease = ARGV[3 + 3 * k], ARGV[4 + 3 * k], tonumber(ARGV[5 + 3 * k])
  local exp = '-'
  if lease >= 0 then exp = tostring(now + lease) end
  local write = ARGV[1] == 'set'
  if not write then
    local old = redis.call('HGET', KEYS[1], id)
    if not old then
      write = true
    else
      local was = string.match(old, '\\n(.*)$')
      write = was ~= '-' and (exp == '-' or tonumber(exp) > tonumber(was))
    end
  end
  if write then
    redis.call('HSET', KEYS[1], id, url .. '\\n' .. exp)
  end
end
for k = 3 + 3 * n, #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[k])
end
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for k = 1, #all, 2 do
  local url, exp = string.match(all[k + 1], '^(.*)\\n(.*)$')
  local left = '-1'
  if exp ~= '-' then left = tostring(tonumber(exp) - now) end
  if exp ~= '-' and tonumber(exp) <= now then
    redis.call('HDEL', KEYS[1], all[k])
  else
    out[#out + 1] = all[k]
    out[#out + 1] = url
    out[#out + 1] = left
  end
end
return out";
