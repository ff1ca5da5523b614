// Classification metrics on logits whose answers are worked out by hand.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <functional>

#include "loratune/metrics.h"

namespace loratune {
namespace {

TEST(Metrics, TopOneTopFivePerClassAndMacro) {
  // 7 classes, 4 samples. Scores are 10 - rank of each class for that sample.
  // sample 0: true 0, ranked first            -> top-1 hit, top-5 hit, predicted 0
  // sample 1: true 1, ranked third (pred 2)   -> top-5 hit, predicted 2
  // sample 2: true 2, ranked sixth (pred 0)   -> miss both, predicted 0
  // sample 3: true 2, ranked first            -> top-1 hit, predicted 2
  const std::vector<std::vector<int64_t>> order = {{0, 1, 2, 3, 4, 5, 6}, {2, 0, 1, 3, 4, 5, 6}, {0, 1, 3, 4, 5, 2, 6},
                                                   {2, 0, 1, 3, 4, 5, 6}};
  at::Tensor logits = at::zeros({4, 7});
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t r = 0; r < 7; ++r) logits[i][order[i][r]] = 10.0 - r;
  const at::Tensor labels = at::tensor({0, 1, 2, 2}, at::kLong);
  const ClassificationMetrics m = compute_metrics(logits, labels);
  EXPECT_DOUBLE_EQ(m.top1, 0.5);
  EXPECT_DOUBLE_EQ(m.top5, 0.75);
  // confusion [true][pred]: (0,0), (1,2), (2,0), (2,2)
  EXPECT_EQ(m.confusion[0][0], 1);
  EXPECT_EQ(m.confusion[1][2], 1);
  EXPECT_EQ(m.confusion[2][0], 1);
  EXPECT_EQ(m.confusion[2][2], 1);
  // class 0: predicted twice, right once -> precision 1/2, recall 1/1; class 1: never predicted -> 0, recall 0;
  // class 2: predicted twice, right once -> 1/2, recall 1/2.
  EXPECT_DOUBLE_EQ(m.per_class[0].precision, 0.5);
  EXPECT_DOUBLE_EQ(m.per_class[0].recall, 1.0);
  EXPECT_DOUBLE_EQ(m.per_class[0].f1, 2.0 / 3.0);
  EXPECT_DOUBLE_EQ(m.per_class[1].f1, 0.0);
  EXPECT_DOUBLE_EQ(m.per_class[2].f1, 0.5);
  EXPECT_EQ(m.per_class[3].support, 0);
  // Macro averages over the classes that have samples (0, 1, 2).
  EXPECT_DOUBLE_EQ(m.macro_precision, (0.5 + 0.0 + 0.5) / 3);
  EXPECT_DOUBLE_EQ(m.macro_recall, (1.0 + 0.0 + 0.5) / 3);
  EXPECT_DOUBLE_EQ(m.macro_f1, (2.0 / 3.0 + 0.0 + 0.5) / 3);
  EXPECT_NEAR(m.loss, at::cross_entropy_loss(logits.to(at::kDouble), labels).item<double>(), 1e-12);
  const auto j = m.to_json({"a", "b", "c", "d", "e", "f", "g"});
  EXPECT_EQ(j["per_class"][1]["class"], "b");
  EXPECT_DOUBLE_EQ(j["top5"].get<double>(), 0.75);
}

// Retrieval ranks against a reference that sorts each query's candidates and walks the order (ties: none at random).
TEST(Metrics, RetrievalRecallAndMeanRankMatchSortedRanks) {
  at::manual_seed(3);
  const int64_t n = 12;
  std::vector<int64_t> owner;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c <= i % 3; ++c) owner.push_back(i);  // one, two or three captions per photo
  const int64_t m = static_cast<int64_t>(owner.size());
  const at::Tensor images = at::randn({n, 4}, at::kDouble), texts = at::randn({m, 4}, at::kDouble) * 3;
  const RetrievalMetrics r = retrieval_metrics(images, texts, owner);
  ASSERT_EQ(r.images, n);
  ASSERT_EQ(r.texts, m);
  const at::Tensor sim = at::matmul(images / images.norm(2, {1}, true), (texts / texts.norm(2, {1}, true)).t());
  const auto rank_of_first_match = [](const at::Tensor& scores, const std::function<bool(int64_t)>& is_match) {
    const at::Tensor order = scores.argsort(0, /*descending=*/true);
    for (int64_t k = 0; k < order.size(0); ++k)
      if (is_match(order[k].item<int64_t>())) return k + 1;
    return int64_t{-1};
  };
  std::vector<double> i2t, t2i;
  for (int64_t i = 0; i < n; ++i)
    i2t.push_back(static_cast<double>(rank_of_first_match(sim[i], [&](int64_t j) { return owner[j] == i; })));
  for (int64_t j = 0; j < m; ++j)
    t2i.push_back(static_cast<double>(rank_of_first_match(sim.select(1, j), [&](int64_t i) { return owner[j] == i; })));
  const auto check = [](const RetrievalDirection& d, const std::vector<double>& ranks) {
    double mean = 0;
    for (double x : ranks) mean += x / static_cast<double>(ranks.size());
    EXPECT_NEAR(d.mean_rank, mean, 1e-12);
    for (size_t k = 0; k < retrieval_recall_ks().size(); ++k) {
      double within = 0;
      for (double x : ranks) within += x <= static_cast<double>(retrieval_recall_ks()[k]);
      EXPECT_NEAR(d.recall[k], within / static_cast<double>(ranks.size()), 1e-12) << "recall@" << retrieval_recall_ks()[k];
    }
  };
  check(r.image_to_text, i2t);
  check(r.text_to_image, t2i);
  EXPECT_GT(r.image_to_text.mean_rank, 1.0);  // random features: not every match first
  // Texts that are their images: everything first.
  std::vector<int64_t> identity(n);
  for (int64_t i = 0; i < n; ++i) identity[static_cast<size_t>(i)] = i;
  const RetrievalMetrics perfect = retrieval_metrics(images, images * 2, identity);
  EXPECT_DOUBLE_EQ(perfect.image_to_text.recall[0], 1.0);
  EXPECT_DOUBLE_EQ(perfect.text_to_image.mean_rank, 1.0);
  EXPECT_EQ(perfect.to_json()["text_to_image"]["recall@10"], 1.0);
}

TEST(Metrics, NoTopFiveForFiveClassesOrFewer) {
  const ClassificationMetrics m = compute_metrics(at::eye(5), at::arange(5, at::kLong));
  EXPECT_DOUBLE_EQ(m.top1, 1.0);
  EXPECT_LT(m.top5, 0);
  EXPECT_FALSE(m.to_json({}).contains("top5"));
}

}  // namespace
}  // namespace loratune
