-- wrk script for tools/loadtest.sh: POSTs one image file to /classify and
-- counts non-2xx responses.
--
--   wrk -c 32 -t 2 -d 10s --latency --timeout 10s -s tools/loadtest.lua \
--       http://127.0.0.1:PORT/classify -- IMAGE_PATH CONTENT_TYPE
--
-- done() prints one machine-readable line starting with "LOADTEST" that
-- tools/loadtest.sh parses (latencies in microseconds).

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   local path = args[1]
   local content_type = args[2] or "application/octet-stream"
   if path == nil then
      error("usage: wrk ... -s loadtest.lua URL -- IMAGE_PATH [CONTENT_TYPE]")
   end
   local f = assert(io.open(path, "rb"))
   local body = f:read("*a")
   f:close()
   wrk.method = "POST"
   wrk.body = body
   wrk.headers["Content-Type"] = content_type
   -- Per-thread counters, read from the main state in done() via thread:get.
   non2xx = 0
   codes = {}
end

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
      local k = tostring(status)
      codes[k] = (codes[k] or 0) + 1
   end
end

function done(summary, latency, requests)
   local n = 0
   local by_code = {}
   for _, t in ipairs(threads) do
      n = n + (t:get("non2xx") or 0)
      local c = t:get("codes") or {}
      for k, v in pairs(c) do
         by_code[k] = (by_code[k] or 0) + v
      end
   end
   local parts = {}
   for k, v in pairs(by_code) do
      table.insert(parts, k .. ":" .. v)
   end
   table.sort(parts)
   local codes_str = #parts > 0 and table.concat(parts, ",") or "-"
   local e = summary.errors
   io.write(string.format(
      "LOADTEST requests=%d duration_us=%d non2xx=%d codes=%s "
         .. "err_connect=%d err_read=%d err_write=%d err_timeout=%d "
         .. "p50_us=%d p90_us=%d p99_us=%d max_us=%d mean_us=%.0f\n",
      summary.requests, summary.duration, n, codes_str,
      e.connect, e.read, e.write, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
end
