-- Gateway budgets + rate limits, script version v2 (also in every key prefix: gw:v2:{team:<team>}:...).
-- ARGV[1] selects the operation (reserve | settle | release | sweep | claim | renew | lease | retire | park |
-- usage); ARGV[2] must equal VERSION.
-- Team and key budgets share the team's hash tag; end-user, tag and session buckets and windows have
-- their own ({user:<id>}, ...), shared by every team: one call spans slots only when it names those.
-- Server time (TIME) drives rate windows and reservation expiry; bucket names come from the client.
--
-- Budget bucket  bud:<scope>:<owner>:<period_id>   hash  spent, reserved, r:<request_id> -> amount held
-- Its deadlines  bres:<scope>:<owner>:<period_id>  zset  request_id -> expiry (server ms)
-- Rate window    rl:<scope>:<owner>                hash  w (minute number), r (requests), t (tokens)
-- Reservation    res:<request_id>                  hash  c (amount held), m (minute), k (estimated tokens)
-- Settled mark   done:<request_id>                 string, TTL = settled_ttl
-- Worker leases  gw:v2:workers                     zset  worker -> lease deadline (server ms)
-- Open requests  gw:v2:open (one Redis), <tag>:open (a cluster: one per hash tag, in the slot of the hold that
--                carries the intent)               hash  hold id -> 'I<worker> <held> <intent json>' (reserved),
--                                                  'R<worker> <record json>' (settled, record not yet in the ledger),
--                                                  'S<worker> <record json>' (its worker died: swept, the sweep
--                                                  writes it), 'W<worker>' (written by the sweep: a tombstone),
--                                                  'B<writer> ...' (a cluster's ledger batch is writing it);
--                                                  on a cluster, a request holding in several slots keeps
--                                                  '\n<cost> <tokens> <intent json>' after an R or S record, so the
--                                                  sweep can settle its other slots too
local VERSION = 'v2'
if ARGV[2] ~= VERSION then
  return redis.error_reply('ERR budget script is ' .. VERSION .. ', caller expects ' .. tostring(ARGV[2]))
end

local function s(n) return string.format('%d', n) end          -- exact integer text for redis.call
local function num(v) if v then return tonumber(v) or 0 end return 0 end

local time = redis.call('TIME')
local now_s = tonumber(time[1])
local now_ms = now_s * 1000 + math.floor(tonumber(time[2]) / 1000)
local minute = math.floor(now_s / 60)
local retry_window = 60 - (now_s % 60)                           -- 1..60 s until the window ends

-- Drop this bucket's expired reservations (replica died before settling); return spent, reserved.
local function purge(bud, bres)
  local expired = redis.call('ZRANGEBYSCORE', bres, '-inf', s(now_ms))
  if #expired > 0 then
    for i = 1, #expired do
      local field = 'r:' .. expired[i]
      local amt = num(redis.call('HGET', bud, field))
      if amt ~= 0 then redis.call('HINCRBY', bud, 'reserved', s(-amt)) end
      redis.call('HDEL', bud, field)
    end
    redis.call('ZREMRANGEBYSCORE', bres, '-inf', s(now_ms))
  end
  local v = redis.call('HMGET', bud, 'spent', 'reserved')
  return num(v[1]), num(v[2])
end

-- Requests and tokens counted in the current minute (0, 0 when the stored window is older).
local function window(rl)
  local v = redis.call('HMGET', rl, 'w', 'r', 't')
  if num(v[1]) ~= minute then return 0, 0 end
  return num(v[2]), num(v[3])
end

local op = ARGV[1]

if op == 'reserve' then
  -- KEYS: res, done, (bud, bres) * nb, rl * nr
  -- ARGV: op, ver, rid, cost, tokens, ttl_ms, partial_min (0: no partial holds), grace_s, nb, nr,
  --       (limit, expireat floor, soft (-1: none), keep_s, window_ms) * nb, (rpm, tpm) * nr
  -- a bucket expires at max(floor, now + keep_s): a calendar period's end plus grace, or keep_s after
  -- its last request for a lifetime (total) or window bucket. window_ms > 0: a sliding-window bucket
  -- (the max_usd_per_minute brake): every request's amount is a hold that drops out window_ms after its
  -- reservation, and settling replaces the hold by the actual cost instead of moving it to 'spent', so
  -- spent + reserved is exactly what requests reserved in the last window_ms cost or may cost
  local rid, cost, tokens = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
  local ttl_ms, partial_min, grace = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
  local nb, nr = tonumber(ARGV[9]), tonumber(ARGV[10])
  local rk, ra = 2 + 2 * nb, 10 + 5 * nb
  -- with a worker lease: KEYS += open[, workers]; ARGV += worker, lease_ms (0 on a cluster: no workers key, the
  -- lease is renewed apart), intent json
  -- a repeated call for a live or settled request is a no-op that reports the current state
  local dup = redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1
  local amount = cost
  if dup then amount = num(redis.call('HGET', KEYS[1], 'c')) end

  local kind, idx, rlimit, rused, retry = 0, 0, 0, 0, -1
  local used, limits, bi, bh, si = {}, {}, 0, 0, 0
  for i = 1, nb do
    local sp, rs = purge(KEYS[2 * i + 1], KEYS[2 * i + 2])
    used[i], limits[i] = sp + rs, tonumber(ARGV[6 + 5 * i])
    local h = limits[i] - used[i]
    if bi == 0 or h < bh then bi, bh = i, h end                  -- the tightest budget decides
    local soft = tonumber(ARGV[8 + 5 * i])
    if si == 0 and soft >= 0 and used[i] >= soft then si = i end -- past a soft threshold
  end
  if not dup and si > 0 then
    kind, idx, rlimit, rused = 4, si, tonumber(ARGV[8 + 5 * si]), used[si]
  elseif not dup and bi > 0 and cost > bh then
    if partial_min > 0 and bh >= partial_min then
      amount = bh                                                 -- cap the hold at the headroom
    else
      kind, idx, rlimit, rused = 1, bi, limits[bi], used[bi]
    end
  end

  local rq, rt = {}, {}
  for j = 1, nr do rq[j], rt[j] = window(KEYS[rk + j]) end
  if kind == 0 and not dup then
    for j = 1, nr do                                              -- requests: the most exhausted rule
      local rpm = tonumber(ARGV[ra + 2 * j - 1])
      if rpm >= 0 and rq[j] + 1 > rpm and (idx == 0 or rpm - rq[j] < rlimit - rused) then
        kind, idx, rlimit, rused, retry = 2, j, rpm, rq[j], retry_window
      end
    end
    if kind == 0 then
      for j = 1, nr do                                            -- tokens
        local tpm = tonumber(ARGV[ra + 2 * j])
        if tpm >= 0 and rt[j] + tokens > tpm and (idx == 0 or tpm - rt[j] < rlimit - rused) then
          kind, idx, rlimit, rused, retry = 3, j, tpm, rt[j], retry_window
          if tokens > tpm then retry = -1 end                     -- can never fit
        end
      end
    end
  end

  local admitted = kind == 0
  local add_n, add_r, add_t = 0, 0, 0
  if admitted and not dup then
    add_n, add_r, add_t = amount, 1, tokens
    for i = 1, nb do
      local bud, bres = KEYS[2 * i + 1], KEYS[2 * i + 2]
      if amount > 0 then
        redis.call('HINCRBY', bud, 'reserved', s(amount))
        redis.call('HSET', bud, 'r:' .. rid, s(amount))
        local win = tonumber(ARGV[10 + 5 * i])
        redis.call('ZADD', bres, s(now_ms + (win > 0 and win or ttl_ms)), rid)
      end
      local at = s(math.max(tonumber(ARGV[7 + 5 * i]), now_s + tonumber(ARGV[9 + 5 * i])))
      redis.call('EXPIREAT', bud, at)
      redis.call('EXPIREAT', bres, at)
    end
    for j = 1, nr do
      local rl = KEYS[rk + j]
      redis.call('HSET', rl, 'w', s(minute), 'r', s(rq[j] + 1), 't', s(rt[j] + tokens))
      redis.call('EXPIRE', rl, 120)
    end
    redis.call('HSET', KEYS[1], 'c', s(amount), 'm', s(minute), 'k', s(tokens))
    redis.call('PEXPIRE', KEYS[1], s(ttl_ms))
    local ext = ra + 2 * nr                                       -- a worker lease: the intent, same step
    if ARGV[ext + 3] and ARGV[ext + 3] ~= '' then
      local kx = rk + nr
      redis.call('HSET', KEYS[kx + 1], rid, 'I' .. ARGV[ext + 1] .. ' ' .. s(amount) .. ' ' .. ARGV[ext + 3])
      if tonumber(ARGV[ext + 2]) > 0 then
        redis.call('ZADD', KEYS[kx + 2], s(now_ms + tonumber(ARGV[ext + 2])), ARGV[ext + 1])
      end
    end
  end

  local lim_r, rem_r, lim_t, rem_t, rem_n = -1, -1, -1, -1, -1
  for j = 1, nr do                                                -- the tightest limits, for headers
    local rpm, tpm = tonumber(ARGV[ra + 2 * j - 1]), tonumber(ARGV[ra + 2 * j])
    if rpm >= 0 and (lim_r < 0 or rpm - rq[j] - add_r < rem_r) then lim_r, rem_r = rpm, rpm - rq[j] - add_r end
    if tpm >= 0 and (lim_t < 0 or tpm - rt[j] - add_t < rem_t) then lim_t, rem_t = tpm, tpm - rt[j] - add_t end
  end
  for i = 1, nb do
    local r = limits[i] - used[i] - add_n
    if i == 1 or r < rem_n then rem_n = r end
  end
  if not admitted then amount = 0 end
  return {admitted and 1 or 0, amount, kind, idx, rlimit, rused, retry, lim_r, rem_r, lim_t, rem_t, rem_n}

elseif op == 'settle' or op == 'release' or op == 'sweep' then
  -- KEYS: res, done, (bud, bres) * nb, rl * nr, [open]
  -- ARGV: op, ver, rid, actual_cost, actual_tokens, settled_ttl_s, grace_s, nb, nr, (floor, keep_s, window_ms) * nb,
  --       [worker, record json[, '1': keep the intent after the record (a cluster's request in several slots)]]
  -- release (a cluster's compensation: another slot refused the request): settle at 0 and also give back
  -- the request this slot's reserve counted in its rate windows (if still in that minute)
  -- settle with a record (a worker lease): the record waits in open as 'R' until the ledger batch writing it
  -- lands (that batch removes it), so a worker killed in between leaves it to the sweep. Returns 1 when
  -- settled now, 0 when settled already.
  -- sweep: a dead worker's intent, settled at its hold (actual_cost) and kept in open as its interrupted
  -- record 'S' until a live worker's batch writes it; 0 if the entry is no intent any more, 2 if the request
  -- was settled already (its record, if any, died with its worker), 1 when swept now.
  local rid, actual, atok = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
  local grace, nb, nr = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
  local ko, ao = 3 + 2 * nb + nr, 10 + 3 * nb                   -- open key, worker and record args
  local tail = ''
  if op == 'sweep' or ARGV[ao + 2] == '1' then
    local e = redis.call('HGET', KEYS[ko], rid)
    if op == 'sweep' and (not e or string.sub(e, 1, 1) ~= 'I') then return 0 end
    if ARGV[ao + 2] == '1' and e and string.sub(e, 1, 1) == 'I' then
      local p = string.find(e, ' ', 1, true)
      p = p and string.find(e, ' ', p + 1, true)
      if p then tail = '\n' .. s(actual) .. ' ' .. s(atok) .. ' ' .. string.sub(e, p + 1) end
    end
  end
  if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[6]) then  -- settled already
    if op == 'sweep' then redis.call('HDEL', KEYS[ko], rid) return 2 end
    return 0
  end
  local rec = redis.call('HMGET', KEYS[1], 'm', 'k')
  redis.call('DEL', KEYS[1])
  for i = 1, nb do
    local bud, bres = KEYS[2 * i + 1], KEYS[2 * i + 2]
    purge(bud, bres)
    local held = redis.call('HGET', bud, 'r:' .. rid)
    local win = tonumber(ARGV[9 + 3 * i])
    if win > 0 then                                               -- a window: the hold becomes the cost
      if held then
        redis.call('HINCRBY', bud, 'reserved', s(actual - num(held)))
        redis.call('HSET', bud, 'r:' .. rid, s(actual))
      elseif actual > 0 then                                      -- held nothing (or aged out): count it now
        redis.call('HINCRBY', bud, 'reserved', s(actual))
        redis.call('HSET', bud, 'r:' .. rid, s(actual))
        redis.call('ZADD', bres, s(now_ms + win), rid)
        redis.call('EXPIREAT', bres, s(now_s + tonumber(ARGV[8 + 3 * i])))
      end
    else
      if held then                                                -- release the whole hold
        redis.call('HINCRBY', bud, 'reserved', s(-num(held)))
        redis.call('HDEL', bud, 'r:' .. rid)
        redis.call('ZREM', bres, rid)
      end
      if actual > 0 then                                          -- then count what was really spent
        redis.call('HINCRBY', bud, 'spent', s(actual))
      end
    end
    if actual > 0 then
      redis.call('EXPIREAT', bud, s(math.max(tonumber(ARGV[7 + 3 * i]), now_s + tonumber(ARGV[8 + 3 * i]))))
    end
  end
  if rec[1] then                                                  -- TPM: replace the estimate by the truth
    local m, est = num(rec[1]), num(rec[2])
    for j = 1, nr do
      local rl = KEYS[2 + 2 * nb + j]
      local v = redis.call('HMGET', rl, 'w', 't')
      if v[1] and num(v[1]) == m then
        redis.call('HSET', rl, 't', s(math.max(0, num(v[2]) + atok - est)))
        if op == 'release' then
          redis.call('HSET', rl, 'r', s(math.max(0, num(redis.call('HGET', rl, 'r')) - 1)))
        end
      end
    end
  end
  if ARGV[ao + 1] and ARGV[ao + 1] ~= '' then
    redis.call('HSET', KEYS[ko], rid, (op == 'sweep' and 'S' or 'R') .. ARGV[ao] .. ' ' .. ARGV[ao + 1] .. tail)
  end
  return 1

elseif op == 'renew' then
  -- KEYS: res, (bud, bres) * nb; ARGV: op, ver, rid, ttl_ms, nb, window_ms * nb (window holds never renew)
  -- Push a live hold's expiry ttl_ms past now (a request still running, e.g. a long stream), so it
  -- does not lapse as if its replica had died. 0 when nothing is left to renew (settled or lapsed).
  local rid, ttl_ms, nb = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
  if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
  redis.call('PEXPIRE', KEYS[1], s(ttl_ms))
  for i = 1, nb do
    local bres = KEYS[2 * i + 1]
    if tonumber(ARGV[5 + i]) == 0 and redis.call('ZSCORE', bres, rid) then
      redis.call('ZADD', bres, 'XX', s(now_ms + ttl_ms), rid)
    end
  end
  return 1

elseif op == 'claim' then
  -- KEYS: open; ARGV: op, ver, rid, worker. A dead worker's settled request whose record is unwritten ('R'):
  -- marked swept ('S'), so only the sweep's batch writes it. 1 when taken now.
  local e = redis.call('HGET', KEYS[1], ARGV[3])
  if not e or string.sub(e, 1, 1) ~= 'R' then return 0 end
  redis.call('HSET', KEYS[1], ARGV[3], 'S' .. string.sub(e, 2))
  return 1

elseif op == 'lease' then
  -- KEYS: workers; ARGV: op, ver, worker, lease_ms. Renew this worker's lease; return the workers whose lease
  -- ran out (their open requests are to be swept).
  redis.call('ZADD', KEYS[1], s(now_ms + tonumber(ARGV[4])), ARGV[3])
  return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', s(now_ms), 'LIMIT', 0, 16)

elseif op == 'retire' then
  -- KEYS: workers; ARGV: op, ver, worker, force. Forget a swept worker unless it came back (lease renewed).
  local at = redis.call('ZSCORE', KEYS[1], ARGV[3])
  if at and (ARGV[4] == '1' or tonumber(at) <= now_ms) then redis.call('ZREM', KEYS[1], ARGV[3]) return 1 end
  return 0

elseif op == 'park' then
  -- KEYS: workers; ARGV: op, ver, worker, until_ms. A swept worker with only tombstones left: not taken for
  -- dead again until they are due (so it never crowds out newly dead workers), unless it came back.
  local at = redis.call('ZSCORE', KEYS[1], ARGV[3])
  if at and tonumber(at) <= now_ms then redis.call('ZADD', KEYS[1], 'XX', ARGV[4], ARGV[3]) return 1 end
  return 0

elseif op == 'usage' then
  -- KEYS: (bud, bres) * nb; ARGV: op, ver, nb
  local out = {}
  for i = 1, tonumber(ARGV[3]) do
    local sp, rs = purge(KEYS[2 * i - 1], KEYS[2 * i])
    out[2 * i - 1], out[2 * i] = sp, rs
  end
  return out
end
return redis.error_reply('ERR unknown budget script operation: ' .. tostring(op))
