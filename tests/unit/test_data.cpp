// Photo folders, decoding and the threaded loader (needs OpenCV), and training on a generated folder.
#include <gtest/gtest.h>

#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <random>

#include "loratune/adapter.h"
#include "loratune/captions.h"
#include "loratune/errors.h"
#include "loratune/image.h"
#include "loratune/transform.h"
#include "loratune/image_folder.h"
#include "loratune/loader.h"
#include "common/files.h"
#include "loratune/trainer.h"
#include "loratune/training_run.h"
#include "loratune/training_setup.h"
#include "test_support.h"

namespace loratune {
namespace {

using test::fixture;

std::filesystem::path images(const std::string& sub) { return fixture("images/" + sub); }

std::string reason_for(const SkippedFiles& skipped, const std::string& name) {
  for (const auto& [path, why] : skipped)
    if (std::filesystem::path(path).filename() == name) return why;
  return "<not skipped>";
}

TEST(ImageFolders, ScanKeepsImagesAtAnyDepthAndSkipsBrokenFiles) {
  const ImageFolder f = scan_image_folder(images("edge"));
  EXPECT_EQ(f.classes, (std::vector<std::string>{"alpha", "beta"}));
  EXPECT_EQ(f.class_counts(), (std::vector<int64_t>{4, 4}));
  ASSERT_EQ(f.skipped.size(), 4u);
  EXPECT_EQ(reason_for(f.skipped, "empty.jpg"), "empty file (0 bytes)");
  EXPECT_EQ(reason_for(f.skipped, "truncated.jpg"), "truncated JPEG (no end-of-image marker)");
  EXPECT_EQ(reason_for(f.skipped, "fake.png"), "not a JPEG, PNG, BMP, WebP or TIFF image (contents do not match)");
  EXPECT_EQ(reason_for(f.skipped, "notes.txt"), "not an image (extension .txt)");
}

TEST(ImageFolders, KoreanClassNamesAreKeptAndSorted) {
  const ImageFolder f = scan_image_folder(images("toy/train"));
  EXPECT_EQ(f.classes, (std::vector<std::string>{"circle", "stripes", "빨간_사각형"}));
  EXPECT_EQ(f.samples.size(), 72u);
}

TEST(ImageFolders, RejectEmptyAndSingleClassFolders) {
  EXPECT_THROW_WITH(scan_image_folder(images("single_class")), InputError,
                    "has 1 class folder; a classifier needs at least two");
  EXPECT_THROW_WITH(scan_image_folder(images("empty_class")), InputError,
                    "class folder broken in " + images("empty_class").string() + " has no usable images (1 files skipped)");
  EXPECT_THROW_WITH(scan_image_folder(images("nowhere")), InputError, "does not exist");
  EXPECT_THROW_WITH(scan_image_folder_for(images("toy/val"), {"circle", "stripes"}), InputError,
                    "has class folders the model does not know: 빨간_사각형");
}

TEST(ImageFolders, StratifiedSplitHoldsOutEachClass) {
  const ImageFolder f = scan_image_folder(images("toy/train"));
  const auto [train, val] = stratified_split(f, 0.25, 7);
  EXPECT_EQ(val.class_counts(), (std::vector<int64_t>{6, 6, 6}));
  EXPECT_EQ(train.class_counts(), (std::vector<int64_t>{18, 18, 18}));
  const auto [train2, val2] = stratified_split(f, 0.25, 7);
  for (size_t i = 0; i < val.samples.size(); ++i) EXPECT_EQ(val.samples[i].path, val2.samples[i].path);
}

// A copy of the toy training folder with a caption file in it, `name` holding `text`.
std::filesystem::path captioned_copy(const std::string& name, const std::string& text) {
  const auto dir = test::temp_dir("captions");
  if (!std::filesystem::exists(dir / "photos"))
    std::filesystem::copy(images("toy/train"), dir / "photos", std::filesystem::copy_options::recursive);
  write_file_atomic(dir / "photos" / name, text);
  return dir / "photos" / name;
}

TEST(Captions, JsonLinesCsvAndTsvLayoutsGiveTheSameCaptionsAndListBadRows) {
  const std::string ko = "빨간_사각형";
  const auto jsonl = captioned_copy(
      "metadata.jsonl", "\xEF\xBB\xBF{\"file_name\": \"circle/000.png\", \"text\": \"a round one\"}\n"
                        "{\"file_name\": \"circle/000.png\", \"text\": [\"again, round\", \"\"]}\r\n"
                        "\n"
                        "{\"file_name\": \"" + ko + "/001.png\", \"text\": \"빨간 사각형\", \"extra\": 3}\n"
                        "{\"file_name\": \"circle/nope.png\", \"text\": \"missing\"}\n"
                        "{\"file_name\": \"circle/001.png\", \"text\": \"bad \xFF byte\"}\n"
                        "[1, 2]\n"
                        "{\"file_name\": \"circle/002.png\"}\n");
  const CaptionFile j = read_captions(jsonl, "");
  EXPECT_EQ(j.column, "text");
  ASSERT_EQ(j.captions.size(), 2u);
  const auto photos = jsonl.parent_path();
  EXPECT_EQ(j.captions.at(photos / "circle/000.png"), (std::vector<std::string>{"a round one", "again, round"}));
  EXPECT_EQ(j.captions.at(photos / (ko + "/001.png")), (std::vector<std::string>{"빨간 사각형"}));
  ASSERT_EQ(j.skipped.size(), 4u);
  EXPECT_EQ(j.skipped[0].first, jsonl.string() + ":5");
  EXPECT_EQ(j.skipped[0].second, "no such photo: " + (photos / "circle/nope.png").string());
  EXPECT_EQ(j.skipped[1], std::make_pair(jsonl.string() + ":6", std::string("not UTF-8 (save the file as UTF-8)")));
  EXPECT_EQ(j.skipped[2].second, "not a JSON object");
  EXPECT_EQ(j.skipped[3], std::make_pair(jsonl.string() + ":8", std::string("no text")));

  const auto csv = captioned_copy("metadata.csv", "file_name,caption\r\ncircle/000.png,a round one\n"
                                                  "circle/000.png,\"again, round\"\n" + ko + "/001.png,\"빨간 사각형\"\n"
                                                  "circle/002.png\n");
  const CaptionFile c = read_captions(csv, "");
  EXPECT_EQ(c.column, "caption");
  EXPECT_EQ(c.captions, j.captions);
  ASSERT_EQ(c.skipped.size(), 1u);
  EXPECT_EQ(c.skipped[0], std::make_pair(csv.string() + ":5", std::string("no caption")));

  const auto tsv = captioned_copy("train.tsv", "title\tfilepath\n\"a round\none\"\t" + (photos / "circle/000.png").string() + "\n");
  const CaptionFile t = read_captions(tsv, "title");
  EXPECT_EQ(t.captions.at(photos / "circle/000.png"), (std::vector<std::string>{"a round\none"}));

  // Attached to the folder: photos without a caption leave it, listed.
  ImageFolder folder = scan_image_folder(photos);
  const size_t photos_before = folder.samples.size(), skipped_before = folder.skipped.size();
  const auto attached = attach_captions(folder, j);
  ASSERT_EQ(folder.samples.size(), 2u);
  EXPECT_EQ(attached.size(), 2u);
  EXPECT_EQ(folder.skipped.size(), skipped_before + photos_before - 2);
  EXPECT_EQ(reason_for(folder.skipped, "002.png"), "no caption in metadata.jsonl");
}

TEST(Captions, FilesThatCannotBeUsedSayWhy) {
  EXPECT_THROW_WITH(read_captions(captioned_copy("a.csv", "path,words\ncircle/000.png,round\n"), ""), InputError,
                    "has no caption column (text, caption, title); its columns: path, words; name one with "
                    "data.caption_column");
  EXPECT_THROW_WITH(read_captions(captioned_copy("b.csv", "name,text\ncircle/000.png,round\n"), ""), InputError,
                    "has no photo column (file_name, filepath, path, image)");
  EXPECT_THROW_WITH(read_captions(captioned_copy("c.csv", "file_name,text\nnope.png,round\n"), ""), InputError,
                    "has no usable caption (1 rows skipped, the first: no such photo");
  EXPECT_THROW_WITH(read_captions(captioned_copy("d.csv", "file_name,text\n\"circle/000.png,round\n"), ""), InputError,
                    "a quoted field is not closed");
  EXPECT_THROW_WITH(read_captions(captioned_copy("e.csv", ""), ""), InputError, "is empty");
  EXPECT_THROW_WITH(read_captions(captioned_copy("f.csv", "file_name,text\n"), "words"), InputError,
                    "has no caption column \"words\"");
  EXPECT_THROW_WITH(read_captions(test::temp_dir("captions") / "none.jsonl", ""), InputError, "cannot read");
  // Mutated bytes: a list of skipped rows or one InputError, never anything else.
  const std::string good = "file_name,text\ncircle/000.png,\"a round, one\"\ncircle/001.png,two\n";
  std::mt19937 rng(7);
  for (int trial = 0; trial < 100; ++trial) {
    std::string bytes = good;
    for (int k = 0; k < 3; ++k) bytes[rng() % bytes.size()] = static_cast<char>(rng() % 256);
    const auto path = captioned_copy("fuzz.csv", bytes);
    try {
      read_captions(path, "");
    } catch (const InputError&) {
    }
  }
}

TEST(Decoding, GreyRgbaSixteenBitAndExifRotation) {
  std::string error;
  const cv::Mat grey = *decode_image(images("edge/alpha/grey.png"), error);
  EXPECT_EQ(grey.channels(), 3);
  EXPECT_EQ(grey.at<cv::Vec3b>(5, 5), cv::Vec3b(100, 100, 100));
  const cv::Mat rgba = *decode_image(images("edge/alpha/rgba.png"), error);
  EXPECT_EQ(rgba.at<cv::Vec3b>(3, 3), cv::Vec3b(200, 0, 0)) << "RGB order";
  const cv::Mat sixteen = *decode_image(images("edge/alpha/sixteen.png"), error);
  EXPECT_EQ(sixteen.type(), CV_8UC3);
  EXPECT_NEAR(sixteen.at<cv::Vec3b>(2, 2)[0], 40000 / 256, 1);
  const cv::Mat rotated = *decode_image(images("edge/alpha/rotated.jpg"), error);
  EXPECT_EQ(rotated.cols, 20);
  EXPECT_EQ(rotated.rows, 40);
  EXPECT_GT(rotated.at<cv::Vec3b>(5, 10)[2], 200) << "the blue half is on top after rotation";
  EXPECT_GT(rotated.at<cv::Vec3b>(35, 10)[0], 200) << "the red half at the bottom";
  for (const char* name : {"photo.webp", "photo.bmp", "photo.tiff", "UPPER.JPG"})
    EXPECT_TRUE(decode_image(images(std::string("edge/beta/nested/deeper/") + name), error).has_value()) << name;
  EXPECT_FALSE(decode_image(images("edge/alpha/fake.png"), error).has_value());
  EXPECT_FALSE(error.empty());
}

TEST(Transforms, EvalTransformNormalisesExactly) {
  Preprocess p;
  p.image_size = 8;
  p.resize_size = 10;
  p.interpolation = cv::INTER_LINEAR;
  p.mean = {0.5f, 0.25f, 0.0f};
  p.std = {0.5f, 0.25f, 1.0f};
  const cv::Mat flat(30, 20, CV_8UC3, cv::Scalar(255, 0, 51));
  const cv::Mat out = eval_transform(flat, p);
  EXPECT_EQ(out.cols, 8);
  EXPECT_EQ(out.rows, 8);
  at::Tensor t = at::empty({3, 8, 8});
  to_normalized_chw(out, p, t);
  EXPECT_FLOAT_EQ(t[0][3][3].item<float>(), 1.0f);
  EXPECT_FLOAT_EQ(t[1][0][7].item<float>(), -1.0f);
  EXPECT_NEAR(t[2][7][0].item<float>(), 0.2f, 1e-6);
}

LoaderOptions training_options(int workers, CacheMode cache) {
  LoaderOptions o;
  o.batch_size = 5;
  o.shuffle = o.drop_last = o.augment = true;
  o.seed = 3;
  o.workers = workers;
  o.prefetch_batches = 2;
  o.cache = cache;
  return o;
}

std::vector<Batch> epoch_batches(ImageBatchSource& source, int64_t epoch, int64_t first = 0) {
  std::vector<Batch> out;
  source.start_epoch(epoch, first);
  while (auto b = source.next()) out.push_back(std::move(*b));
  return out;
}

Preprocess toy_preprocess() {
  Preprocess p;
  p.image_size = 32;
  p.resize_size = 36;
  p.interpolation = cv::INTER_LINEAR;
  p.mean = {0.5f, 0.5f, 0.5f};
  p.std = {0.5f, 0.5f, 0.5f};
  return p;
}

TEST(Loader, SameBatchesWhateverTheNumberOfWorkers) {
  const ImageFolder f = scan_image_folder(images("toy/train"));
  ImageBatchSource one(f, toy_preprocess(), training_options(1, CacheMode::kOff));
  ImageBatchSource many(f, toy_preprocess(), training_options(3, CacheMode::kOff));
  for (int64_t epoch : {0, 1}) {
    const auto a = epoch_batches(one, epoch), b = epoch_batches(many, epoch);
    ASSERT_EQ(a.size(), 14u);  // 72 images, batches of 5, last incomplete one dropped
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_EQ(a[i].indices, b[i].indices);
      EXPECT_TRUE(at::equal(a[i].images, b[i].images));
    }
  }
  const auto e0 = epoch_batches(one, 0), e1 = epoch_batches(one, 1);
  EXPECT_NE(e0[0].indices, e1[0].indices) << "each epoch is shuffled anew";
  const auto tail = epoch_batches(many, 1, 10);
  ASSERT_EQ(tail.size(), 4u);
  EXPECT_TRUE(at::equal(tail[0].images, e1[10].images)) << "a resumed epoch continues with the same batches";
}

TEST(Loader, CacheGivesTheSameEvalBatches) {
  const ImageFolder f = scan_image_folder(images("toy/val"));
  LoaderOptions o;
  o.batch_size = 7;
  o.workers = 2;
  ImageBatchSource plain(f, toy_preprocess(), o);
  o.cache = CacheMode::kMemory;
  ImageBatchSource cached(f, toy_preprocess(), o);
  EXPECT_TRUE(cached.caching());
  for (int pass = 0; pass < 2; ++pass) {
    const auto a = epoch_batches(plain, 0), b = epoch_batches(cached, 0);
    ASSERT_EQ(a.size(), 4u);
    EXPECT_EQ(a.back().images.size(0), 3) << "the last batch of an eval pass is kept";
    for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(at::equal(a[i].images, b[i].images));
  }
}

TEST(Loader, BrokenFilesFoundWhileDecodingAreSkippedAndListed) {
  ImageFolder f = scan_image_folder(images("edge"));
  f.samples.push_back({images("edge/alpha/fake.png"), 0});  // slipped past the scan
  LoaderOptions o;
  o.batch_size = 16;
  ImageBatchSource source(f, toy_preprocess(), o);
  const auto batches = epoch_batches(source, 0);
  EXPECT_EQ(batches[0].images.size(0), 8);
  const auto skipped = source.skipped();
  ASSERT_EQ(skipped.size(), f.skipped.size() + 1);
  EXPECT_EQ(skipped.back(), std::make_pair(images("edge/alpha/fake.png").string(),
                                           std::string("cannot decode (damaged or unsupported image)")));
}

TEST(TrainingOnPhotos, LossFallsAndValidationBeatsChance) {
  const ImageFolder train_folder = scan_image_folder(images("toy/train"));
  const ImageFolder val_folder = scan_image_folder_for(images("toy/val"), train_folder.classes);
  const auto dir = test::temp_dir("photos");
  const TrainConfig c = parse_train_config({{"model", fixture("models/timm_script.pt").string()},
                                            {"data", {{"train", "-"}}},
                                            {"output_dir", dir.string()},
                                            {"epochs", 4},
                                            {"batch_size", 8},
                                            {"precision", "fp32"},
                                            {"optim", {{"lr", 0.005}}}},
                                           "test");
  auto model = build_training_model(c, {"a", "b", "c"});
  LoaderOptions o = training_options(2, CacheMode::kAuto);
  o.batch_size = 8;
  ImageBatchSource train(train_folder, toy_preprocess(), o);
  LoaderOptions vo;
  ImageBatchSource val(val_folder, toy_preprocess(), vo);
  const TrainSummary s = Trainer(c, *model, train, &val, train_folder.classes, c10::Device(c10::kCPU), Precision::kFp32).run(false);
  EXPECT_GT(s.best_val_top1, 0.8) << "chance is 1/3";
  std::ifstream metrics(dir / Trainer::kMetrics);
  std::vector<double> losses;
  for (std::string line; std::getline(metrics, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j["type"] == "train") losses.push_back(j["loss"]);
  }
  ASSERT_GE(losses.size(), 2u);
  EXPECT_LT(losses.back(), 0.5 * losses.front());
}

// A reporter that keeps the lines it is given.
struct KeptLines : TrainingReporter {
  std::vector<std::string> messages, warnings;
  void message(const std::string& text) override { messages.push_back(text); }
  void warning(const std::string& text) override { warnings.push_back(text); }
  bool has(const std::vector<std::string>& lines, const std::string& part) const {
    return std::any_of(lines.begin(), lines.end(), [&](const std::string& l) { return l.find(part) != std::string::npos; });
  }
};

TEST(TrainingRun, OneCallFromConfigToRunAndAStoppedRunResumesToTheSameAdapter) {
  const auto dir = test::temp_dir("training_run");
  auto config = [&](const std::string& out) {
    return parse_train_config({{"model", fixture("models/timm_script.pt").string()},
                               {"data", {{"train", images("edge").string()}, {"val_fraction", 0.25}, {"workers", 2}}},
                               {"epochs", 2}, {"batch_size", 2}, {"precision", "fp32"}, {"seed", 5}, {"threads", 1},
                               {"output_dir", (dir / out).string()}},
                              "test");
  };
  auto lines = std::make_shared<KeptLines>();
  TrainingRunOptions options;
  options.reporter = lines;
  at::set_num_threads(3);
  const TrainingRun whole = run_training(config("whole"), options);
  EXPECT_EQ(at::get_num_threads(), 3) << "the run's thread count (1) does not outlive it";
  EXPECT_TRUE(whole.lead);
  EXPECT_EQ(whole.summary.epochs, 2);
  EXPECT_EQ(whole.summary.steps, 6) << "3 + 3 training images in batches of 2, for two epochs";
  EXPECT_TRUE(lines->has(lines->messages, "2 classes: alpha, beta"));
  EXPECT_TRUE(lines->has(lines->messages, "LoRA on "));
  EXPECT_TRUE(lines->has(lines->warnings, "skipped 4 files"));

  TrainingRunOptions stopped;
  stopped.reporter = std::make_shared<TrainingReporter>();
  stopped.stop_after_step = [](int64_t step) { return step == 4; };
  EXPECT_THROW(run_training(config("split"), stopped), Interrupted);
  EXPECT_EQ(at::get_num_threads(), 3);
  EXPECT_THROW_WITH(run_training(config("split"), {}), InputError, "already holds a run; continue it with --resume");
  TrainingRunOptions resumed;
  resumed.resume = true;
  resumed.reporter = stopped.reporter;
  EXPECT_EQ(run_training(config("split"), resumed).summary.steps, 6);
  EXPECT_EQ(read_file(dir / "split" / Trainer::kLastAdapter / kAdapterWeightsName),
            read_file(dir / "whole" / Trainer::kLastAdapter / kAdapterWeightsName));
}

}  // namespace
}  // namespace loratune
