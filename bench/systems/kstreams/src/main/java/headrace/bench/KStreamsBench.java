package headrace.bench;

import java.time.Duration;
import java.util.Arrays;
import java.util.HashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;

import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.KeyValue;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Grouped;
import org.apache.kafka.streams.kstream.Materialized;
import org.apache.kafka.streams.kstream.Produced;
import org.apache.kafka.streams.kstream.Suppressed;
import org.apache.kafka.streams.kstream.TimeWindows;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.state.KeyValueBytesStoreSupplier;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.StoreBuilder;
import org.apache.kafka.streams.state.Stores;
import org.apache.kafka.streams.state.WindowStore;

/**
 * Kafka Streams under the headrace benchmark (bench/README.md). One stream thread, record
 * cache off (one output per update, like every other system), until SIGTERM.
 *
 * <ul>
 *   <li>{@code --scenario count} (S1/S2): input keyed by word, count per key, emit the running
 *       count (key = word, value = int64).
 *   <li>{@code --scenario window} (S7): count per key per 10 s tumbling window of the record
 *       timestamp, grace = the 2 s out-of-orderness the other systems allow, one final result
 *       per window ({@code suppress(untilWindowCloses)}): key = {@code <word>@<window start>},
 *       value = int64.
 *   <li>{@code --scenario lines} (S5): unkeyed lines, split into lower-case words
 *       ({@code flatMap}, keyed by word: a repartition topic), count per word, emit the running
 *       count (key = word, value = int64).
 *   <li>{@code --scenario user} (S6): input keyed by user, value {@code <category>|<padding>};
 *       a Processor API processor with two stores (the user's record count, and the count per
 *       user and category, the counterpart of headrace's ValueState and MapState), emitting
 *       {@code <user>:<category>} = that count (int64).
 * </ul>
 */
public final class KStreamsBench {
  public static void main(String[] args) throws Exception {
    Map<String, String> a = new HashMap<>();
    for (int i = 0; i + 1 < args.length; i += 2) {
      a.put(args[i].replaceFirst("^--", ""), args[i + 1]);
    }
    String scenario = a.getOrDefault("scenario", "count");
    boolean inMemory = "memory".equals(a.getOrDefault("backend", "rocksdb"));
    Properties p = new Properties();
    p.put(StreamsConfig.APPLICATION_ID_CONFIG, a.get("app"));
    p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, a.get("bootstrap"));
    p.put(StreamsConfig.STATE_DIR_CONFIG, a.getOrDefault("state-dir", "/tmp/kstreams-bench"));
    p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, 1);
    p.put(StreamsConfig.STATESTORE_CACHE_MAX_BYTES_CONFIG, 0);
    p.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, 1000);
    p.put(
        StreamsConfig.PROCESSING_GUARANTEE_CONFIG,
        "exactly_once".equals(a.getOrDefault("guarantee", "at_least_once"))
            ? StreamsConfig.EXACTLY_ONCE_V2
            : StreamsConfig.AT_LEAST_ONCE);
    p.put(StreamsConfig.consumerPrefix("auto.offset.reset"), "earliest");
    p.put(StreamsConfig.consumerPrefix("max.poll.records"), 2000);
    p.put(StreamsConfig.producerPrefix("linger.ms"), 5);

    StreamsBuilder b = new StreamsBuilder();
    var input = b.stream(a.get("input"), Consumed.with(Serdes.String(), Serdes.Bytes()));
    var grouped = input.groupByKey(Grouped.with(Serdes.String(), Serdes.Bytes()));
    if ("lines".equals(scenario)) {
      input
          .flatMap(
              (k, line) -> {
                String text = new String(line.get(), java.nio.charset.StandardCharsets.UTF_8);
                String trimmed = text.toLowerCase(Locale.ROOT).trim();
                if (trimmed.isEmpty()) {
                  return List.<KeyValue<String, String>>of();
                }
                return Arrays.stream(trimmed.split("\\s+"))
                    .map(w -> KeyValue.pair(w, w))
                    .toList();
              })
          .groupByKey(Grouped.with(Serdes.String(), Serdes.String()))
          .count(keyValueStore("counts", inMemory))
          .toStream()
          .to(a.get("output"), Produced.with(Serdes.String(), Serdes.Long()));
    } else if ("user".equals(scenario)) {
      b.addStateStore(storeBuilder("totals", inMemory));
      b.addStateStore(storeBuilder("per-category", inMemory));
      input
          .process(UserStats::new, "totals", "per-category")
          .to(a.get("output"), Produced.with(Serdes.String(), Serdes.Long()));
    } else if ("window".equals(scenario)) {
      Duration size = Duration.ofSeconds(10);
      Duration grace = Duration.ofMillis(Long.parseLong(a.getOrDefault("grace-ms", "2000")));
      Materialized<String, Long, WindowStore<Bytes, byte[]>> store =
          inMemory
              ? Materialized.<String, Long>as(
                      Stores.inMemoryWindowStore("counts", size.plus(grace), size, false))
                  .withKeySerde(Serdes.String())
                  .withValueSerde(Serdes.Long())
              : Materialized.<String, Long, WindowStore<Bytes, byte[]>>as("counts")
                  .withKeySerde(Serdes.String())
                  .withValueSerde(Serdes.Long());
      grouped
          .windowedBy(TimeWindows.ofSizeAndGrace(size, grace))
          .count(store)
          .suppress(Suppressed.untilWindowCloses(Suppressed.BufferConfig.unbounded()))
          .toStream()
          .map((wk, n) -> KeyValue.pair(wk.key() + "@" + wk.window().start(), n))
          .to(a.get("output"), Produced.with(Serdes.String(), Serdes.Long()));
    } else {
      grouped
          .count(keyValueStore("counts", inMemory))
          .toStream()
          .to(a.get("output"), Produced.with(Serdes.String(), Serdes.Long()));
    }
    KafkaStreams streams = new KafkaStreams(b.build(), p);
    CountDownLatch done = new CountDownLatch(1);
    Runtime.getRuntime()
        .addShutdownHook(
            new Thread(
                () -> {
                  streams.close(Duration.ofSeconds(30));
                  done.countDown();
                }));
    streams.start();
    done.await();
  }

  private static KeyValueBytesStoreSupplier supplier(String name, boolean inMemory) {
    return inMemory ? Stores.inMemoryKeyValueStore(name) : Stores.persistentKeyValueStore(name);
  }

  private static Materialized<String, Long, KeyValueStore<Bytes, byte[]>> keyValueStore(
      String name, boolean inMemory) {
    return Materialized.<String, Long>as(supplier(name, inMemory))
        .withKeySerde(Serdes.String())
        .withValueSerde(Serdes.Long());
  }

  /** A changelogged store without a record cache (one changelog write per update). */
  private static StoreBuilder<KeyValueStore<String, Long>> storeBuilder(
      String name, boolean inMemory) {
    return Stores.keyValueStoreBuilder(supplier(name, inMemory), Serdes.String(), Serdes.Long())
        .withCachingDisabled();
  }

  /** S6: the user's record count and the count per (user, category); emits the latter. */
  static final class UserStats implements Processor<String, Bytes, String, Long> {
    private ProcessorContext<String, Long> context;
    private KeyValueStore<String, Long> totals;
    private KeyValueStore<String, Long> perCategory;

    @Override
    public void init(ProcessorContext<String, Long> context) {
      this.context = context;
      this.totals = context.getStateStore("totals");
      this.perCategory = context.getStateStore("per-category");
    }

    @Override
    public void process(Record<String, Bytes> record) {
      String user = record.key();
      byte[] value = record.value().get();
      int bar = 0;
      while (bar < value.length && value[bar] != '|') {
        bar++;
      }
      String category = new String(value, 0, bar, java.nio.charset.StandardCharsets.UTF_8);
      Long total = totals.get(user);
      totals.put(user, total == null ? 1L : total + 1);
      String key = user + ":" + category;
      Long n = perCategory.get(key);
      long next = n == null ? 1L : n + 1;
      perCategory.put(key, next);
      context.forward(record.withKey(key).withValue(next));
    }
  }
}
