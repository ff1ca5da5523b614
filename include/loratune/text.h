// loratune::text: the CLIP (BPE) and SigLIP (SentencePiece) tokenizers and zero-shot classification heads from a
// text encoder. Needs ICU; includes the core library.
#pragma once

#include "loratune/clip_tokenizer.h"
#include "loratune/loratune.h"
#include "loratune/sentencepiece_tokenizer.h"
#include "loratune/text_tokenizer.h"
#include "loratune/zero_shot.h"
