// A Supabase Edge Function between the app and the SAM 3 backend. It creates the segmentation_results row as the
// user (so row-level security applies), hands the job to the backend with "async": true, and answers 202 at once;
// the app then watches the row until the backend marks it completed or failed (docs/edge-example.md).
//
//   POST  Authorization: Bearer <the user's JWT>   {"image_key": "images/<user>/photo.jpg", "prompt": "dog"}
//   ->    the backend's answer: 202 {"task_id": "<the row id>", "status": "queued", "status_url"}, or its
//         {"error": {"code", "message"}} with its HTTP status (and Retry-After on 429 queue_full)
//
// Environment: SUPABASE_URL and SUPABASE_ANON_KEY (Supabase sets them), SAM3_URL and SAM3_API_KEY (secrets).
import { createClient } from "@supabase/supabase-js";
import createApiClient from "openapi-fetch";
import type { components, paths } from "./sam3-api.d.ts";

const sam3 = createApiClient<paths>({
  baseUrl: Deno.env.get("SAM3_URL"),
  headers: { "X-API-Key": Deno.env.get("SAM3_API_KEY") },
});

function fail(status: number, code: string, message: string): Response {
  return Response.json({ error: { code, message } }, { status });
}

Deno.serve(async (request) => {
  if (request.method !== "POST") return fail(405, "method_not_allowed", "POST a JSON body");
  const authorization = request.headers.get("Authorization");
  if (!authorization) return fail(401, "unauthorized", "sign in first: no Authorization header");
  const { image_key, prompt } = await request.json().catch(() => ({}));
  if (typeof image_key !== "string" || typeof prompt !== "string") {
    return fail(422, "invalid_request", 'send {"image_key": "<key in the bucket>", "prompt": "<noun phrase>"}');
  }

  // The user's own client: PostgREST checks the JWT and the row's insert policy fills user_id with auth.uid().
  const supabase = createClient(Deno.env.get("SUPABASE_URL")!, Deno.env.get("SUPABASE_ANON_KEY")!, {
    global: { headers: { Authorization: authorization } },
  });
  const { data: row, error: insertError, status: insertStatus } = await supabase
    .from("segmentation_results")
    .insert({ image_url: image_key })
    .select("id, user_id")
    .single();
  if (insertError) {
    return insertStatus === 401
      ? fail(401, "unauthorized", insertError.message)
      : fail(502, "row_not_created", insertError.message);
  }

  try {
    // Declared with the schema's type: a field the backend does not know (it would ignore it) is a type error.
    const job: components["schemas"]["PredictRequest"] = {
      async: true,
      task_id: row.id,
      user_id: row.user_id,
      image_url: image_key,
      text_prompt: prompt,
      include_rle: false,
    };
    const { data, error, response } = await sam3.POST("/api/v1/predict", { body: job });
    // 202 {"task_id", "status": "queued", "status_url"}, or a refusal {"error": {"code", "message"}}: passed on as is
    const retryAfter = response.headers.get("Retry-After");
    return Response.json(data ?? error, {
      status: response.status,
      headers: retryAfter ? { "Retry-After": retryAfter } : {},
    });
  } catch (exception) {
    return fail(502, "backend_unreachable", `the SAM 3 backend did not answer: ${exception}`);
  }
});
