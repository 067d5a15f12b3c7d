-- bench/post.lua: wrk script for loopback benchmarks of the gateway and the mock upstream.
--
--   WRK_BODY_FILE=body.json [WRK_HEADERS=$'Authorization: Bearer x\nX-Foo: y'] \
--     wrk -t1 -c32 -d10s --latency -s bench/post.lua http://127.0.0.1:4100/v1/chat/completions
--
-- env WRK_BODY_FILE  JSON request body, sent with every request (required)
-- env WRK_HEADERS    extra request headers, one "Name: value" per line (optional)
--
-- done() prints one machine-readable line (run.py parses it):
--   WRK_RESULT {"requests":..,"duration_s":..,"rps":..,"p50_ms":..,"p90_ms":..,"p99_ms":..,...}

local path = os.getenv("WRK_BODY_FILE")
if path == nil or path == "" then
  error("post.lua: set WRK_BODY_FILE to the JSON body file")
end
local fh = io.open(path, "rb")
if fh == nil then
  error("post.lua: cannot open " .. path)
end
local payload = fh:read("*a")
fh:close()

wrk.method = "POST"
wrk.body = payload
wrk.headers["Content-Type"] = "application/json"

local raw_headers = os.getenv("WRK_HEADERS")
if raw_headers ~= nil then
  for line in string.gmatch(raw_headers, "[^\r\n]+") do
    local colon = string.find(line, ":", 1, true)
    if colon ~= nil then
      local name = string.gsub(string.sub(line, 1, colon - 1), "^%s+", "")
      name = string.gsub(name, "%s+$", "")
      local value = string.gsub(string.sub(line, colon + 1), "^%s+", "")
      value = string.gsub(value, "%s+$", "")
      if name ~= "" then
        wrk.headers[name] = value
      end
    end
  end
end

local function ms(us)
  return string.format("%.4f", us / 1000.0)
end

function done(summary, latency, requests)
  local secs = summary.duration / 1000000.0
  local e = summary.errors
  local rps = 0
  if secs > 0 then
    rps = summary.requests / secs
  end
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_s":%.3f,"rps":%.1f,"bytes":%d,' ..
    '"p50_ms":%s,"p90_ms":%s,"p99_ms":%s,"max_ms":%s,"mean_ms":%s,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, secs, rps, summary.bytes,
    ms(latency:percentile(50)), ms(latency:percentile(90)), ms(latency:percentile(99)),
    ms(latency.max), ms(latency.mean),
    e.connect, e.read, e.write, e.status, e.timeout))
end
