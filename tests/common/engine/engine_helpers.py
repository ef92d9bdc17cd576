"""Helpers shared by the engine tests."""

import torch


def run_to_completion(engine, max_steps=10_000):
    """Steps until idle; returns ({request_id: token ids}, {request_id: finish_reason})."""
    tokens, reasons = {}, {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return tokens, reasons
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
            if output.finished:
                reasons[output.request_id] = output.finish_reason
    raise AssertionError("engine did not finish")


@torch.no_grad()
def hf_greedy(hf_model, prompt_token_ids, max_new_tokens):
    """transformers' greedy continuation of one prompt: (token ids, per-step logits [n, V])."""
    out = hf_model.generate(
        torch.tensor([prompt_token_ids], device=hf_model.device), max_new_tokens=max_new_tokens,
        do_sample=False, eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
    )
    return out.sequences[0, len(prompt_token_ids):].tolist(), torch.cat(out.logits).float().cpu()
