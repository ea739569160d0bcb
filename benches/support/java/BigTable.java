// Writes a large Iceberg table the way a Spark job's commits do, for the
// table_rewrite benchmark: COMMITS fast appends of FILES data files each, with
// full column metrics (value, null and size counts and bounds for every
// column) and split offsets, by Iceberg's own Java library (its manifest and
// manifest-list writers, deflate-compressed Avro). The data files themselves
// are not written: a metadata rewrite never reads them.
//
// usage: java -cp CLASSPATH BigTable LOCATION COMMITS FILES   (prints the metadata.json)
import java.nio.ByteBuffer;
import java.util.HashMap;
import java.util.Map;
import org.apache.hadoop.conf.Configuration;
import org.apache.iceberg.*;
import org.apache.iceberg.hadoop.HadoopTables;
import org.apache.iceberg.types.Conversions;
import org.apache.iceberg.types.Types;

public class BigTable {
  public static void main(String[] args) {
    String location = args[0];
    int commits = Integer.parseInt(args[1]);
    int files = Integer.parseInt(args[2]);
    Schema schema = new Schema(
        Types.NestedField.optional(1, "id", Types.LongType.get()),
        Types.NestedField.optional(2, "category", Types.StringType.get()),
        Types.NestedField.optional(3, "value", Types.DoubleType.get()),
        Types.NestedField.optional(4, "ts", Types.TimestampType.withZone()),
        Types.NestedField.optional(5, "note", Types.StringType.get()));
    PartitionSpec spec = PartitionSpec.builderFor(schema).identity("category").build();
    Map<String, String> props = new HashMap<>();
    props.put("format-version", "2");
    Table table = new HadoopTables(new Configuration()).create(schema, spec, props, location);
    long row = 0;
    for (int c = 0; c < commits; c++) {
      AppendFiles append = table.newFastAppend();
      for (int f = 0; f < files; f++) {
        Map<Integer, Long> counts = new HashMap<>();
        Map<Integer, Long> nulls = new HashMap<>();
        Map<Integer, Long> sizes = new HashMap<>();
        Map<Integer, ByteBuffer> lower = new HashMap<>();
        Map<Integer, ByteBuffer> upper = new HashMap<>();
        for (int id = 1; id <= 5; id++) { counts.put(id, 1000L); nulls.put(id, 0L); sizes.put(id, 4000L + id); }
        lower.put(1, Conversions.toByteBuffer(Types.LongType.get(), row));
        upper.put(1, Conversions.toByteBuffer(Types.LongType.get(), row + 999));
        lower.put(2, Conversions.toByteBuffer(Types.StringType.get(), "c" + (f % 8)));
        upper.put(2, Conversions.toByteBuffer(Types.StringType.get(), "c" + (f % 8)));
        lower.put(3, Conversions.toByteBuffer(Types.DoubleType.get(), 0.5));
        upper.put(3, Conversions.toByteBuffer(Types.DoubleType.get(), 999.5));
        lower.put(4, Conversions.toByteBuffer(Types.TimestampType.withZone(), 1_700_000_000_000_000L + row));
        upper.put(4, Conversions.toByteBuffer(Types.TimestampType.withZone(), 1_700_000_000_999_000L + row));
        lower.put(5, Conversions.toByteBuffer(Types.StringType.get(), "note-aaaaaaaaaaaa"));
        upper.put(5, Conversions.toByteBuffer(Types.StringType.get(), "note-zzzzzzzzzzzz"));
        Metrics metrics = new Metrics(1000L, sizes, counts, nulls, new HashMap<>(), lower, upper);
        DataFile file = DataFiles.builder(spec)
            .withPath(location + "/data/category=c" + (f % 8) + "/" + c + "-" + f + "-00001-4f0e8c1a-7d2b-4b9e-9c3a-" + String.format("%012d", row) + ".parquet")
            .withFormat(FileFormat.PARQUET)
            .withPartitionPath("category=c" + (f % 8))
            .withFileSizeInBytes(48_000L + f)
            .withMetrics(metrics)
            .withSplitOffsets(java.util.List.of(4L))
            .build();
        append.appendFile(file);
        row += 1000;
      }
      append.commit();
    }
    System.out.println(((HasTableOperations) table).operations().current().metadataFileLocation());
  }
}
