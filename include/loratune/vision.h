// loratune::vision: photo folders, image decoding and augmentation, the threaded loader, and the training use case
// on photo folders (run_training). Needs OpenCV; includes the core library.
#pragma once

#include "loratune/captions.h"
#include "loratune/image.h"
#include "loratune/image_folder.h"
#include "loratune/loader.h"
#include "loratune/loratune.h"
#include "loratune/training_run.h"
#include "loratune/transform.h"
