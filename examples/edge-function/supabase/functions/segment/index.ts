// A Supabase Edge Function between the app and the SAM 3 backend. It creates the segmentation_results row as the
// user (so row-level security applies), hands the job to the backend with "async": true, and answers 202 at once;
// the app then watches the row until the backend marks it completed or failed (docs/edge-example.md).
//
//   POST  Authorization: Bearer <the user's JWT>   {"image_key": "images/<user>/photo.jpg", "prompt": "dog"}
//         or, to track through a clip:               {"video_key": "videos/<user>/clip.mp4", "prompt": "dog"}
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
  const { image_key, video_key, prompt } = await request.json().catch(() => ({}));
  const key = image_key ?? video_key;
  if (typeof key !== "string" || typeof prompt !== "string" || (image_key && video_key)) {
    return fail(
      422,
      "invalid_request",
      'send {"image_key" or "video_key": "<key in the bucket>", "prompt": "<noun phrase>"}',
    );
  }

  // The user's own client: PostgREST checks the JWT and the row's insert policy fills user_id with auth.uid().
  const supabase = createClient(Deno.env.get("SUPABASE_URL")!, Deno.env.get("SUPABASE_ANON_KEY")!, {
    global: { headers: { Authorization: authorization } },
  });
  const { data: row, error: insertError, status: insertStatus } = await supabase
    .from("segmentation_results")
    .insert({ image_url: key })
    .select("id, user_id")
    .single();
  if (insertError) {
    return insertStatus === 401
      ? fail(401, "unauthorized", insertError.message)
      : fail(502, "row_not_created", insertError.message);
  }

  try {
    // Declared with the schema's types: a field the backend does not know (it would ignore it) is a type error.
    const { data, error, response } = video_key
      ? await sam3.POST("/api/v1/predict/video", { body: videoJob(row.id, row.user_id, video_key, prompt) })
      : await sam3.POST("/api/v1/predict", { body: imageJob(row.id, row.user_id, image_key, prompt) });
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

function imageJob(
  taskId: string,
  userId: string,
  key: string,
  prompt: string,
): components["schemas"]["PredictRequest"] {
  return {
    async: true,
    task_id: taskId,
    user_id: userId,
    image_url: key,
    text_prompt: prompt,
    include_rle: false,
  };
}

// Always async; the row's result gets the tracked objects' summary, the per-frame masks go to R2 (its mask_url).
function videoJob(
  taskId: string,
  userId: string,
  key: string,
  prompt: string,
): components["schemas"]["VideoPredictRequest"] {
  return { task_id: taskId, user_id: userId, video_url: key, prompts: [prompt] };
}
