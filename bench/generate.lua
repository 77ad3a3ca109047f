-- wrk script: non-streaming /api/generate, as a batch client sends it.
wrk.method = "POST"
wrk.path = "/api/generate"
wrk.body = '{"model":"llama3.2","prompt":"Why is the sky blue?","stream":false}'
wrk.headers["Content-Type"] = "application/json"
